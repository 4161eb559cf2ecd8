"""Provisioned TLS material: SAN for loopback, CA chain, private keys 0600, OpenSSH node keys."""

import ipaddress
import stat

import pytest

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from coordinator.pki import create_node_key, create_server_tls
from fedsilo.errors import ConfigError


def test_server_certificate_is_signed_by_the_ca_for_loopback(tmp_path):
    tls = create_server_tls(tmp_path)
    ca = x509.load_pem_x509_certificate(tls.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in (tls.key, tmp_path / "ca.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600


def test_node_keys_are_openssh_ec_p384(tmp_path):
    key = create_node_key(tmp_path, "hospital0")
    private = load_ssh_private_key(key.private_key.read_bytes(), None)
    public = load_ssh_public_key(key.public_key.read_bytes())
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()
    assert stat.S_IMODE(key.private_key.stat().st_mode) == 0o600
    assert key.fingerprint.startswith("SHA256:")


def test_node_key_bytes_are_what_flowers_register_command_stores(tmp_path):
    # The coordinator tells a node's site by the key in Flower's node record: it must be byte-for-byte what
    # `flwr supernode register` sends for the same .pub file.
    from flwr.cli.supernode.register import try_load_public_key

    from coordinator.pki import create_node_key, load_node_keys, node_key_bytes

    for site in ("hospital0", "hospital1"):
        create_node_key(tmp_path, site)
    assert node_key_bytes(tmp_path / "hospital0.pub") == try_load_public_key(tmp_path / "hospital0.pub")
    keys = load_node_keys(tmp_path)
    assert sorted(keys.values()) == ["hospital0", "hospital1"]
    assert keys[try_load_public_key(tmp_path / "hospital1.pub")] == "hospital1"
    (tmp_path / "broken.pub").write_text("not a key")
    with pytest.raises(ConfigError, match="broken.pub is not an OpenSSH public key"):
        load_node_keys(tmp_path)


def test_node_keys_need_one_key_per_site_and_skip_copies(tmp_path):
    import shutil

    from coordinator.pki import load_node_keys

    with pytest.raises(ConfigError, match="holds no <site>.pub node key"):
        load_node_keys(tmp_path)
    create_node_key(tmp_path, "hospital0")
    create_node_key(tmp_path, "hospital1")
    shutil.copyfile(tmp_path / "hospital1.pub", tmp_path / "hospital1.old.pub")  # not a site id: not read
    assert sorted(load_node_keys(tmp_path).values()) == ["hospital0", "hospital1"]
    shutil.copyfile(tmp_path / "hospital0.pub", tmp_path / "hospital2.pub")
    with pytest.raises(ConfigError, match="hospital0.pub and hospital2.pub hold the same key"):
        load_node_keys(tmp_path)
