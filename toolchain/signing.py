"""Ed25519 keys and artifact signing (central side).

The format is specified in docs/artifact.md; the device side checks it in C++
(``csrc/artifact/verify.cc``) with the same libsodium primitives PyNaCl wraps here.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import nacl.exceptions
import nacl.signing

from edgesmith.runtime.keys import edgesmith_home, read_hex_key
from edgesmith.toolchain.errors import UserError

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


def generate_key(name: str = "default", directory: Path | None = None, overwrite: bool = False) -> Path:
    """Write ``NAME.key`` (0600, hex seed) and ``NAME.pub`` (hex public key); return the .key path."""
    directory = Path(directory) if directory else edgesmith_home() / "keys"
    directory.mkdir(parents=True, exist_ok=True)
    key_path, pub_path = directory / f"{name}.key", directory / f"{name}.pub"
    if key_path.exists() and not overwrite:
        raise UserError(f"{key_path} already exists; pass --force to replace it (artifacts signed with it will then need the old .pub to verify)")
    sk = nacl.signing.SigningKey.generate()
    tmp = key_path.with_suffix(".key.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(bytes(sk).hex() + "\n")
    os.replace(tmp, key_path)
    pub_path.write_text(bytes(sk.verify_key).hex() + "\n")
    return key_path


def load_signing_key(path: Path) -> SigningKey:
    seed = read_hex_key(path, "signing key", "create one with `edgesmith keys generate`")
    return SigningKey(seed, Path(path))


def default_signing_key() -> SigningKey:
    """The user's default key, created on first use."""
    path = edgesmith_home() / "keys" / "default.key"
    if not path.exists():
        generate_key("default", path.parent)
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
