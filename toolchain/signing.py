"""Ed25519 keys and artifact signing (central side).

The format is specified in docs/artifact.md; the device side checks it in C++
(``csrc/artifact/verify.cc``) with the same libsodium primitives PyNaCl wraps here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.signing

from edgesmith.runtime.keys import edgesmith_home, read_hex_key
from edgesmith.toolchain.errors import UserError
from edgesmith.toolchain.files import fsync, private_dirs

SIG_FILE = "manifest.sig"
MANIFEST_FILE = "manifest.json"


def key_id(public_key: bytes) -> str:
    return hashlib.sha256(public_key).hexdigest()[:16]


@dataclass(frozen=True)
class SigningKey:
    seed: bytes
    path: Path | None = None

    @property
    def public_key(self) -> bytes:
        return bytes(nacl.signing.SigningKey(self.seed).verify_key)

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)


KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def _check_key_name(name: str) -> None:
    if not KEY_NAME.match(name) or name.endswith((".key", ".pub")):
        raise UserError(f"key name {name!r} is not allowed; use 1-64 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit and without a .key/.pub suffix")


def _write_new(path: Path, text: str, mode: int) -> None:
    """Create ``path`` (never an existing file: O_EXCL) with ``mode`` from the start, and sync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())




def generate_key(name: str = "default", directory: Path | None = None, overwrite: bool = False) -> Path:
    """Write ``NAME.key`` (mode 0600, hex seed) and ``NAME.pub`` (hex public key); return the .key path.

    Both are fully written (and synced) under temporary names first, the secret one created with
    mode 0600 and O_EXCL, so no other mode is ever visible. Without ``overwrite`` the .key name is
    claimed with ``link``, which never clobbers (two concurrent runs cannot both win), then the .pub
    is moved beside it; a crash in between leaves a .key whose .pub ``load_signing_key`` rewrites.
    """
    _check_key_name(name)
    directory = Path(directory) if directory else edgesmith_home() / "keys"
    private_dirs(directory)
    key_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    if key_path.exists() and not overwrite:
        raise UserError(f"{key_path} already exists; pass --force to replace it (artifacts signed with it will then need the old .pub to verify)")
    sk = nacl.signing.SigningKey.generate()
    token = uuid.uuid4().hex[:8]
    tmp_key, tmp_pub = directory / f".{name}.key.{token}.tmp", directory / f".{name}.pub.{token}.tmp"
    try:
        _write_new(tmp_key, bytes(sk).hex() + "\n", 0o600)
        _write_new(tmp_pub, bytes(sk.verify_key).hex() + "\n", 0o644)
        if overwrite:
            os.replace(tmp_pub, pub_path)
            os.replace(tmp_key, key_path)
        else:
            try:
                os.link(tmp_key, key_path)
            except FileExistsError:
                raise UserError(f"{key_path} already exists; pass --force to replace it") from None
            os.replace(tmp_pub, pub_path)
        fsync(directory)
    finally:
        for tmp in (tmp_key, tmp_pub):
            tmp.unlink(missing_ok=True)
    return key_path


def load_signing_key(path: Path) -> SigningKey:
    """Read a .key file; one readable by group or others is refused (with the chmod that fixes it)."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UserError(f"signing key {path} does not exist; create one with `edgesmith keys generate`") from None
    if mode & 0o077:
        raise UserError(f"signing key {path} is accessible by group or others (mode {stat.S_IMODE(mode):04o}), so it may be "
                        f"leaked; run `chmod 600 {path}` if only you have read it, else generate a new key")
    seed = read_hex_key(path, "signing key", "create one with `edgesmith keys generate`")
    key = SigningKey(seed, path)
    pub = path.with_suffix(".pub")
    if path.suffix == ".key" and not pub.exists():  # an interrupted generate_key; the seed determines it
        tmp = path.with_name(f".{pub.name}.{uuid.uuid4().hex[:8]}.tmp")
        _write_new(tmp, key.public_key.hex() + "\n", 0o644)
        os.replace(tmp, pub)
    return key


def ephemeral_key() -> SigningKey:
    """A throwaway key held in memory only: builds sign their staging directory with it so the
    device runtime will load the artifact for validation, and sign with the real key only what passed."""
    return SigningKey(bytes(nacl.signing.SigningKey.generate()))


def default_signing_key() -> SigningKey:
    """The user's default key, created on first use (only `edgesmith build` calls this)."""
    path = edgesmith_home() / "keys" / "default.key"
    if not path.exists():
        try:
            generate_key("default", path.parent)
        except UserError:  # another build created it meanwhile
            pass
    return load_signing_key(path)


def sign_manifest(manifest_bytes: bytes, key: SigningKey) -> bytes:
    """Return the bytes of manifest.sig for these exact manifest.json bytes."""
    sk = nacl.signing.SigningKey(key.seed)
    signature = sk.sign(manifest_bytes).signature
    sig = {
        "algorithm": "ed25519",
        "key_id": key.key_id,
        "public_key": key.public_key.hex(),
        "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "signature": signature.hex(),
    }
    return (json.dumps(sig, indent=2, sort_keys=True) + "\n").encode()


def verify_signature_py(manifest_bytes: bytes, sig_bytes: bytes) -> bool:
    """Pure-Python check of a signature, used by tests to cross-check the C++ verifier."""
    sig = json.loads(sig_bytes)
    vk = nacl.signing.VerifyKey(bytes.fromhex(sig["public_key"]))
    try:
        vk.verify(manifest_bytes, bytes.fromhex(sig["signature"]))
    except nacl.exceptions.BadSignatureError:
        return False
    return True


# ---- deploy keys (docs/deployment.md §2-3) ------------------------------------------------------------
# A deploy key signs desired states, never artifacts. It lives in its own directory so that no
# device given the build keys' directory (``keys/*.pub``) ever trusts it as a build key, nor the
# reverse: a device lists the two kinds separately in its trust_dir (build/, deploy/).

def deploy_keys_dir() -> Path:
    return edgesmith_home() / "keys" / "deploy"


def generate_deploy_key(name: str = "default", directory: Path | None = None, overwrite: bool = False) -> Path:
    """Write ``NAME.key``/``NAME.pub`` under the deploy keys' directory (see ``generate_key``)."""
    return generate_key(name, Path(directory) if directory else deploy_keys_dir(), overwrite=overwrite)


def load_deploy_key(path: Path | None = None) -> SigningKey:
    """The deploy key at ``path``, or the default one; never created implicitly, since no device
    would trust a key made on the fly."""
    path = Path(path) if path else deploy_keys_dir() / "default.key"
    if not path.exists():
        raise UserError(f"there is no deploy key at {path}; create one with `edgesmith keys generate --deploy` and "
                        "provision its .pub into each device's trust_dir/deploy/")
    if path.resolve().parent == (edgesmith_home() / "keys").resolve():
        raise UserError(f"{path} is a build key (it is in {path.parent}); desired states are signed with a deploy key "
                        "from `edgesmith keys generate --deploy`, so a build key's holder cannot move the fleet")
    return load_signing_key(path)
