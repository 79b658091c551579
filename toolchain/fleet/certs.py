"""A fleet's small PKI (docs/broker-security.md): one CA per broker directory, a server certificate
for the broker (and the artifact server), and one client certificate per login whose Common Name
is the login's name, so that with mutual TLS (`use_identity_as_username`) the certificate *is* the
identity: a device's certificate can only ever log in as that device.

Keys are ECDSA P-256 (small, fast on devices, supported by OpenSSL 1.1.1 and later); private keys
are written mode 0600 and never leave the directory they are issued into.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgesmith.toolchain.errors import UserError

CA_DAYS = 3650
LEAF_DAYS = 825  # what browsers accept for server certificates; devices are re-issued with `broker certs`


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


def _write(path: Path, data: bytes, private: bool) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgesmith"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def ca_paths(tls_dir: Path) -> Issued:
    return Issued(tls_dir / "ca.crt", tls_dir / "ca.key")


def ca_ensure(tls_dir: Path, label: str) -> Issued:
    """The directory's CA, created the first time (an existing one is kept: devices trust it)."""
    paths = ca_paths(tls_dir)
    if paths.cert.is_file() and paths.key.is_file():
        return paths
    tls_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    name = _name(f"edgesmith fleet CA ({label})")
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write(paths.key, _key_pem(key), private=True)
    _write(paths.cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return paths


def _load_ca(tls_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    paths = ca_paths(tls_dir)
    if not (paths.cert.is_file() and paths.key.is_file()):
        raise UserError(f"no fleet CA in {tls_dir}; create it with `edgesmith broker certs --dir {tls_dir.parent}`")
    cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
    key = serialization.load_pem_private_key(paths.key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise UserError(f"{paths.key} is not the EC key edgesmith creates; recreate the CA with `edgesmith broker certs`")
    return cert, key


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def issue(tls_dir: Path, common_name: str, out: Path, *, server_hosts: list[str] | None = None) -> Issued:
    """A leaf certificate signed by the directory's CA into ``out``.crt/.key. With ``server_hosts`` it
    is a server certificate for those names and addresses; otherwise a client certificate whose
    Common Name is the login ``common_name``."""
    ca_cert, ca_key = _load_ca(tls_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server_hosts else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(ca_cert.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=LEAF_DAYS))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if server_hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in dict.fromkeys(server_hosts)]),
                                        critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    paths = Issued(out.with_name(out.name + ".crt"), out.with_name(out.name + ".key"))
    _write(paths.key, _key_pem(key), private=True)
    _write(paths.cert, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return paths
