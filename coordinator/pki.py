"""Keys and certificates for a federation, with pyca/cryptography.

- A certificate authority (EC P-384, self-signed, CA:TRUE, pathlen 0).
- The SuperLink's TLS server certificate, signed by the CA, with the coordinator's address as
  subjectAltName (RFC 5280 section 4.2.1.6: clients match IP addresses against SAN iPAddress).
- One SuperNode authentication key pair per site: EC P-384 in OpenSSH format, as Flower's
  ``flwr supernode register`` and ``flower-supernode --auth-supernode-private-key`` read them.

Private keys are written with mode 0600 and never logged.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CURVE = ec.SECP384R1()


@dataclass(frozen=True)
class ServerTLS:
    ca_cert: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class NodeKey:
    site: str
    private_key: Path
    public_key: Path
    fingerprint: str  # sha256 of the OpenSSH public key line, for out-of-band confirmation


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsilo"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def create_server_tls(out_dir: Path, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 365) -> ServerTLS:
    """Create a CA and a server certificate for ``hosts`` (IP addresses or DNS names)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(CURVE)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedsilo federation CA"))
        .issuer_name(_name("fedsilo federation CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(CURVE)
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    tls = ServerTLS(ca_cert=out_dir / "ca.crt", cert=out_dir / "server.pem", key=out_dir / "server.key")
    tls.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    tls.cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(tls.key, server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    # The CA key signs nothing after provisioning; keep it out of reach of running processes.
    _write_private(out_dir / "ca.key", ca_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return tls


def create_node_key(out_dir: Path, site: str) -> NodeKey:
    """An EC P-384 SuperNode authentication key pair in OpenSSH format."""
    key = ec.generate_private_key(CURVE)
    private = out_dir / f"{site}.key"
    public = out_dir / f"{site}.pub"
    _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public.write_bytes(line + f" fedsilo-{site}\n".encode())
    return NodeKey(site=site, private_key=private, public_key=public, fingerprint="SHA256:" + hashlib.sha256(line).hexdigest())
