"""``silo start`` before Flower: the site folder set up from the kit, and the refusals (TLS, key modes, wrong folder)."""

from __future__ import annotations

import datetime as dt
import shutil
import stat
import subprocess
import sys

import pytest

from compliance import AuditLog
from compliance.keys import read_vkey_file
from coordinator.provision import parse_project, provision
from fedsilo.errors import ConfigError
from silo_agent.approvals import trusted_officers
from silo_agent.node import check_node_key, check_tls, install_kit, load_site_kit, probe_coordinator
from silo_agent.site import Site, init_site
from silo_agent.witnessing import open_witness, witness_fingerprint

PROJECT = {"federation": "test-fed", "coordinator": {"addresses": ["127.0.0.1"], "port": 9093},
           "sites": [{"id": "hospital0", "officers": ["j.smith", "a.jones"]}, {"id": "hospital1"}]}


@pytest.fixture
def kits(tmp_path):
    provision(parse_project(PROJECT), tmp_path / "kits")
    return tmp_path / "kits"


def test_first_start_sets_up_the_site_folder_from_the_kit(kits, tmp_path):
    kit = load_site_kit(kits / "hospital0")
    assert (kit.site, kit.federation, kit.coordinator, kit.officers) == ("hospital0", "test-fed", "127.0.0.1:9093", ("j.smith", "a.jones"))
    said: list[str] = []
    site = install_kit(kit, tmp_path / "site0", report=said.append)
    assert Site.open(tmp_path / "site0").site_id == "hospital0"
    kit_witness = read_vkey_file(kits / "hospital0" / "witness" / "hospital0-witness.vkey")
    assert witness_fingerprint(site.root, "hospital0") == kit_witness.fingerprint
    assert stat.S_IMODE((site.root / "keys" / "hospital0-witness.key").stat().st_mode) == 0o600
    assert open_witness(site.root, "hospital0", site.audit_dir) is not None  # trusts the coordinator's checkpoint key
    assert (site.root / "trust" / "fedsilo-coordinator.vkey").read_text() == (kits / "coordinator" / "audit-keys" / "fedsilo-coordinator.vkey").read_text()
    assert {k.name for k in trusted_officers(site)} == {"j.smith", "a.jones"}
    for officer in ("j.smith", "a.jones"):
        assert stat.S_IMODE((site.root / "officers" / f"{officer}.key").stat().st_mode) == 0o600
    assert any("officer j.smith added" in line for line in said)
    # Idempotent: a restart changes nothing and records nothing new.
    with AuditLog.open(site.audit_dir) as log:
        before = len(list(log.records()))
    install_kit(kit, tmp_path / "site0", report=said.append)
    with AuditLog.open(site.audit_dir) as log:
        records = list(log.records())
    assert len(records) == before
    changes = [r["details"]["change"] for r in records if r["event"] == "config.changed"]
    assert changes.count("officer key added") == 2 and changes.count("coordinator checkpoint key trusted") == 1


def test_a_folder_of_another_site_or_with_its_own_witness_key_is_refused(kits, tmp_path):
    install_kit(load_site_kit(kits / "hospital1"), tmp_path / "site1", report=lambda _: None)
    with pytest.raises(ConfigError, match="belongs to site hospital1, the kit is for hospital0"):
        install_kit(load_site_kit(kits / "hospital0"), tmp_path / "site1", report=lambda _: None)
    own = init_site(tmp_path / "own", "hospital0")  # made with 'silo init': its own witness key
    fingerprint = witness_fingerprint(own.root, "hospital0")
    with pytest.raises(ConfigError, match="already has its own witness key"):
        install_kit(load_site_kit(kits / "hospital0"), tmp_path / "own", report=lambda _: None)
    # As the fix says: its public key goes to the coordinator, and the kit's witness key is deleted.
    shutil.rmtree(kits / "hospital0" / "witness")
    install_kit(load_site_kit(kits / "hospital0"), tmp_path / "own", report=lambda _: None)
    assert witness_fingerprint(own.root, "hospital0") == fingerprint
    with pytest.raises(ConfigError, match="has no witness key"):
        install_kit(load_site_kit(kits / "hospital0"), tmp_path / "new", report=lambda _: None)


def test_a_rotated_coordinator_key_is_trusted_and_the_old_one_kept(kits, tmp_path):
    kit = load_site_kit(kits / "hospital1")
    site = install_kit(kit, tmp_path / "site1", report=lambda _: None)
    old = read_vkey_file(site.root / "trust" / "fedsilo-coordinator.vkey")
    provision(parse_project(PROJECT), tmp_path / "kits2")
    (kits / "hospital1" / "trust" / "fedsilo-coordinator.vkey").write_bytes((tmp_path / "kits2" / "hospital1" / "trust" / "fedsilo-coordinator.vkey").read_bytes())
    said: list[str] = []
    install_kit(kit, tmp_path / "site1", report=said.append)
    trusted = {read_vkey_file(p) for p in (site.root / "trust").glob("*.vkey")}
    assert old in trusted and read_vkey_file(kits / "hospital1" / "trust" / "fedsilo-coordinator.vkey") in trusted and len(trusted) == 2
    assert any("changed" in line for line in said)


def test_no_tls_material_or_a_readable_node_key_is_refused_and_an_expiring_ca_warns(kits):
    kit = load_site_kit(kits / "hospital0")
    warnings: list[str] = []
    check_tls(kit, report=warnings.append)
    assert warnings == []
    check_tls(kit, report=warnings.append, now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=3650 - 10))
    assert len(warnings) == 1 and "expires on" in warnings[0]
    with pytest.raises(ConfigError, match="expired"):
        check_tls(kit, report=warnings.append, now=dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=3651))
    kit.node_key.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        check_node_key(kit)
    kit.ca_cert.unlink()
    with pytest.raises(ConfigError, match="refusing to run without TLS"):
        check_tls(kit)


def test_silo_start_without_a_kit_is_one_line_exit_2(tmp_path, kits):
    def start(*args):
        return subprocess.run([sys.executable, "-m", "silo_agent.node", *args], capture_output=True, text=True, timeout=120)

    for args, needle in (((("--kit", str(tmp_path / "nothing"), "--site-dir", str(tmp_path / "s"))), "is not a site kit"),
                         (("--kit", str(kits / "hospital0"), "--site-dir", str(tmp_path / "s"), "--threads", "0"), "--threads must be 1 or more")):
        done = start(*args)
        assert done.returncode == 2 and "Traceback" not in done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], done.stderr
    (kits / "hospital0" / "ca.crt").unlink()
    done = start("--kit", str(kits / "hospital0"), "--site-dir", str(tmp_path / "s"))
    assert done.returncode == 2 and "refusing to run without TLS" in done.stderr
    assert not (tmp_path / "s").exists()  # refused before touching the site folder


def _tls_server(cert, key):
    """A real TLS listener on loopback with the coordinator kit's certificate; answers handshakes until closed."""
    import socket
    import ssl
    import threading

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass

    threading.Thread(target=serve, daemon=True).start()
    return listener


def test_the_coordinators_certificate_is_checked_before_flower_connects(tmp_path):
    import dataclasses

    project = {**PROJECT, "coordinator": {"addresses": ["127.0.0.1"], "port": 9093, "certificate_days": 20}}
    provision(parse_project(project), tmp_path / "kits")
    provision(parse_project(PROJECT), tmp_path / "other")
    coordinator = tmp_path / "kits" / "coordinator"
    listener = _tls_server(coordinator / "server.pem", coordinator / "server.key")
    try:
        port = listener.getsockname()[1]
        kit = dataclasses.replace(load_site_kit(tmp_path / "kits" / "hospital0"), coordinator=f"127.0.0.1:{port}")
        said: list[str] = []
        assert probe_coordinator(kit, report=said.append)
        assert len(said) == 1 and "coordinator's certificate expires on" in said[0] and "19 days left" in said[0]
        # Another federation's CA does not vouch for this coordinator.
        stranger = dataclasses.replace(load_site_kit(tmp_path / "other" / "hospital0"), coordinator=f"127.0.0.1:{port}")
        with pytest.raises(ConfigError, match="is not the federation's"):
            probe_coordinator(stranger, report=said.append)
    finally:
        listener.close()
    said.clear()
    # A port held bound but not listening: nobody can answer there (a port merely closed might be taken by
    # another test's server meanwhile).
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        silent = dataclasses.replace(kit, coordinator=f"127.0.0.1:{held.getsockname()[1]}")
        assert not probe_coordinator(silent, report=said.append)  # nobody listens: a note, not an error
    assert "does not answer yet" in said[0]


def test_add_start_command_registers_silo_start():
    """What silo_agent/cli.py calls to get ``fedsilo silo start``."""
    import argparse

    from silo_agent import node

    parser = argparse.ArgumentParser()
    node.add_start_command(parser.add_subparsers(dest="silo_command"))
    args = parser.parse_args(["start", "--kit", "KIT", "--site-dir", "SITE", "--isolation", "subprocess", "--threads", "2"])
    assert args.func is node._start
    assert (str(args.kit), str(args.site_dir), args.isolation, args.threads, args.insecure_dev) == ("KIT", "SITE", "subprocess", 2, False)
