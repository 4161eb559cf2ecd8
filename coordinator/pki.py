"""Keys and certificates for a federation, with pyca/cryptography.

- A certificate authority (EC P-384, self-signed, CA:TRUE, pathlen 0).
- The SuperLink's TLS server certificate, signed by the CA, with the coordinator's address as
  subjectAltName (RFC 5280 section 4.2.1.6: clients match IP addresses against SAN iPAddress).
- One SuperNode authentication key pair per site: EC P-384 in OpenSSH format, as Flower's
  ``flwr supernode register`` and ``flower-supernode --auth-supernode-private-key`` read them.

Private keys are written with mode 0600 and never logged. Fingerprints, for confirming material out of
band: SHA-256 of a certificate's DER encoding, SHA-256 of a node's OpenSSH public key line.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedsilo.errors import ConfigError

CURVE = ec.SECP384R1()
#: A certificate that expires within this many days gives a warning when a coordinator or silo starts.
EXPIRY_WARNING_DAYS = 30


@dataclass(frozen=True)
class ServerTLS:
    ca_cert: Path
    cert: Path
    key: Path


@dataclass(frozen=True)
class CertificateAuthority:
    cert_path: Path
    key_path: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


@dataclass(frozen=True)
class NodeKey:
    site: str
    private_key: Path
    public_key: Path
    fingerprint: str  # sha256 of the OpenSSH public key line, for out-of-band confirmation


def write_private(path: Path, data: bytes) -> None:
    """Write key material with mode 0600 (whatever the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(data)


_write_private = write_private  # the earlier name


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsilo"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def create_ca(cert_path: Path, key_path: Path, *, common_name: str = "fedsilo federation CA", days: int = 3650) -> CertificateAuthority:
    """A self-signed CA certificate (``cert_path``) and its private key (``key_path``, 0600)."""
    now = dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(CURVE)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    write_private(key_path, _pem_key(key))
    return CertificateAuthority(cert_path, key_path, cert, key)


def load_ca(cert_path: Path, key_path: Path) -> CertificateAuthority:
    """An existing CA (to issue a new server certificate without re-provisioning the sites)."""
    for path in (cert_path, key_path):
        if not path.is_file():
            raise ConfigError(f"no {path.name} at {path.parent}", fix="give the CA folder written by 'fedsilo provision' (KITS/ca)")
    check_private_mode(key_path)
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except ValueError:
        raise ConfigError(f"{cert_path.parent} does not hold a PEM CA certificate and key", fix="give KITS/ca from 'fedsilo provision'") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key().public_numbers() != cert.public_key().public_numbers():
        raise ConfigError(f"{key_path} is not the key of {cert_path}", fix="restore both files of KITS/ca from the same backup")
    return CertificateAuthority(cert_path, key_path, cert, key)


def host_names(hosts: tuple[str, ...] | list[str]) -> list[x509.GeneralName]:
    """subjectAltName entries: an IP address as iPAddress, anything else as dNSName."""
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    return sans


def issue_server_cert(ca: CertificateAuthority, cert_path: Path, key_path: Path, *, hosts: tuple[str, ...], days: int = 365) -> None:
    """A TLS server certificate for ``hosts`` signed by ``ca``; its private key at ``key_path`` (0600)."""
    if not hosts:
        raise ConfigError("a server certificate needs at least one host name or IP address", fix="list the coordinator's addresses")
    now = dt.datetime.now(dt.timezone.utc)
    server_key = ec.generate_private_key(CURVE)
    not_after = min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc)  # never outlive the CA
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca.cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(host_names(hosts)), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA384())
    )
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    write_private(key_path, _pem_key(server_key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def create_server_tls(out_dir: Path, *, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"), days: int = 365) -> ServerTLS:
    """Create a CA and a server certificate for ``hosts`` (IP addresses or DNS names), all in ``out_dir``.

    For a throw-away loopback federation; ``fedsilo provision`` keeps the CA key apart instead.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    # The CA key signs nothing after provisioning; keep it out of reach of running processes.
    ca = create_ca(out_dir / "ca.crt", out_dir / "ca.key", days=days)
    tls = ServerTLS(ca_cert=out_dir / "ca.crt", cert=out_dir / "server.pem", key=out_dir / "server.key")
    issue_server_cert(ca, tls.cert, tls.key, hosts=hosts, days=days)
    return tls


def create_node_key(out_dir: Path, site: str, *, stem: str | None = None) -> NodeKey:
    """An EC P-384 SuperNode authentication key pair in OpenSSH format (``<stem or site>.key`` / ``.pub``)."""
    key = ec.generate_private_key(CURVE)
    private = out_dir / f"{stem or site}.key"
    public = out_dir / f"{stem or site}.pub"
    write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    line = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    public.write_bytes(line + f" fedsilo-{site}\n".encode())
    return NodeKey(site=site, private_key=private, public_key=public, fingerprint=ssh_fingerprint_of_line(line))


# --- fingerprints and checks ------------------------------------------------------------------------------


def ssh_fingerprint_of_line(line: bytes) -> str:
    """SHA-256 of an OpenSSH public key line's ``type base64`` part (the comment is not part of the key)."""
    parts = line.split()
    return "SHA256:" + hashlib.sha256(b" ".join(parts[:2])).hexdigest()


def _read_node_public_key(public_key: Path):
    """(the key file's line, the key) of a node public key file (.pub, OpenSSH); a one-line error otherwise."""
    try:
        line = public_key.read_bytes().strip()
        return line, serialization.load_ssh_public_key(line)
    except (OSError, ValueError, UnsupportedAlgorithm):
        raise ConfigError(f"{public_key} is not an OpenSSH public key", fix="use the node.pub written by 'fedsilo provision'") from None


def node_key_fingerprint(public_key: Path) -> str:
    """The fingerprint of a node public key file (.pub), as printed in the kits' README files."""
    return ssh_fingerprint_of_line(_read_node_public_key(public_key)[0])


def load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError:
        raise ConfigError(f"cannot read the certificate {path}", fix="restore it from the kit") from None
    except ValueError:
        raise ConfigError(f"{path} is not a PEM certificate", fix="restore it from the kit") from None


def certificate_fingerprint(path: Path) -> str:
    """SHA-256 of the certificate's DER encoding (what ``openssl x509 -noout -fingerprint -sha256`` prints, as hex)."""
    cert = load_certificate(path)
    return "SHA256:" + cert.fingerprint(hashes.SHA256()).hex()


def certificate_sans(path: Path) -> list[str]:
    cert = load_certificate(path)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in sans.get_values_for_type(x509.IPAddress)] + list(sans.get_values_for_type(x509.DNSName))


def expiry_warning(path: Path, what: str, *, now: dt.datetime | None = None, warn_days: int = EXPIRY_WARNING_DAYS) -> str | None:
    """A warning line when the certificate at ``path`` expires within ``warn_days``; refuses an expired one.

    Raises:
        ConfigError: the certificate has expired or is not valid yet.
    """
    cert = load_certificate(path)
    now = now or dt.datetime.now(dt.timezone.utc)
    if now >= cert.not_valid_after_utc:
        raise ConfigError(f"the {what} ({path}) expired on {cert.not_valid_after_utc:%Y-%m-%d}",
                          fix="issue a new one: fedsilo coordinator renew-cert (server certificate) or re-provision (CA)")
    if now < cert.not_valid_before_utc:
        raise ConfigError(f"the {what} ({path}) is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC",
                          fix="check this machine's clock")
    left = cert.not_valid_after_utc - now
    if left < dt.timedelta(days=warn_days):
        return (f"WARNING: the {what} ({path}) expires on {cert.not_valid_after_utc:%Y-%m-%d} ({left.days} days left); "
                f"renew it before then (docs/deployment.md, 'Rotation')")
    return None


def check_private_mode(path: Path) -> None:
    """Refuse a private key file that group or others can read."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if os.name == "posix" and mode & 0o077:
        raise ConfigError(f"{path} is readable by others (mode {mode:o})", fix=f"chmod 600 {path}")


def node_key_bytes(public_key: Path) -> bytes:
    """A node public key file (.pub, OpenSSH) as Flower's SuperLink stores it (PEM SubjectPublicKeyInfo, what
    ``flwr supernode register`` sends), so a node's key in Flower's node records can be matched to its site."""
    key = _read_node_public_key(public_key)[1]
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def load_node_keys(folder: Path) -> dict[bytes, str]:
    """The sites' node keys of a coordinator kit (``sites/<site>.pub``, a site id as the name: a copy such as
    ``hospital1.old.pub`` is not read): key as Flower stores it -> site. No key, or one key for two sites, is an
    error: either would leave the coordinator unable to tell the sites apart."""
    from coordinator.provision import NAME_RE

    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder of <site>.pub node keys", fix="give the kit's sites/ folder")
    keys: dict[bytes, str] = {}
    for path in sorted(folder.glob("*.pub")):
        if not NAME_RE.fullmatch(path.stem):
            continue
        key = node_key_bytes(path)
        if key in keys:
            raise ConfigError(f"{folder}: {keys[key]}.pub and {path.name} hold the same key", fix="give each site its own node key")
        keys[key] = path.stem
    if not keys:
        raise ConfigError(f"{folder} holds no <site>.pub node key", fix="restore the kit's sites/ folder from 'fedsilo provision'")
    return keys
