"""Provisioning kits: files and modes, SAN, fingerprints in the READMEs, the CA key kept apart, refusals;
the coordinator's start checks (TLS required, expiry warning) and certificate renewal."""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from compliance.keys import load_signer, read_vkey_file
from coordinator import pki
from coordinator.deployment import check_tls, load_coordinator_kit, renew_server_certificate, write_cli_config
from coordinator.provision import load_project, parse_project, provision
from fedsilo.errors import ConfigError, VerificationError

REPO = Path(__file__).resolve().parents[2]
PROJECT = {
    "federation": "test-fed",
    "coordinator": {"addresses": ["fl.example.org", "203.0.113.10"], "port": 9093},
    "sites": [{"id": "hospital0", "officers": ["j.smith"]}, {"id": "hospital1"}],
}


def fedsilo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedsilo.cli", *args], capture_output=True, text=True, timeout=120)


def assert_one_line_error(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsilo: error:"), done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kits")
    provision(parse_project(PROJECT), out)
    return out


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_every_kit_has_its_files_and_private_keys_are_0600(kits):
    expected = {
        "ca": {"ca.crt", "ca.key", "README.md"},
        "coordinator": {"ca.crt", "server.pem", "server.key", "coordinator.yaml", "README.md", "sites/hospital0.pub", "sites/hospital1.pub",
                        "audit-keys/fedsilo-coordinator.key", "audit-keys/fedsilo-coordinator.vkey", "audit-trust/fedsilo-coordinator.vkey",
                        "audit-trust/hospital0-witness.vkey", "audit-trust/hospital1-witness.vkey"},
        "hospital0": {"ca.crt", "node.key", "node.pub", "site-kit.yaml", "README.md", "witness/hospital0-witness.key",
                      "witness/hospital0-witness.vkey", "trust/fedsilo-coordinator.vkey", "officers/j.smith.key", "officers/j.smith.vkey"},
        "hospital1": {"ca.crt", "node.key", "node.pub", "site-kit.yaml", "README.md", "witness/hospital1-witness.key",
                      "witness/hospital1-witness.vkey", "trust/fedsilo-coordinator.vkey"},
        "researcher": {"ca.crt", "README.md"},
    }
    assert {p.name for p in kits.iterdir()} == set(expected)
    for kit, files in expected.items():
        found = {str(p.relative_to(kits / kit)) for p in (kits / kit).rglob("*") if p.is_file()}
        assert found == files, kit
    for path in kits.rglob("*"):
        if path.is_file():
            mode = stat.S_IMODE(path.stat().st_mode)
            if path.suffix == ".key":
                assert mode == 0o600, path
            else:
                assert not mode & 0o022, path  # nothing is writable by others
    # The keys are what Flower and fedsilo load.
    node = load_ssh_private_key((kits / "hospital0" / "node.key").read_bytes(), None)
    assert node.public_key().public_numbers() == load_ssh_public_key((kits / "coordinator" / "sites" / "hospital0.pub").read_bytes()).public_numbers()
    load_signer(kits / "coordinator" / "audit-keys", "fedsilo-coordinator")
    load_signer(kits / "hospital0" / "witness", "hospital0-witness")
    load_signer(kits / "hospital0" / "officers", "j.smith")


def test_server_certificate_names_the_coordinator_and_chains_to_the_ca(kits):
    ca, server = _cert(kits / "ca" / "ca.crt"), _cert(kits / "coordinator" / "server.pem")
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("203.0.113.10"), ipaddress.ip_address("127.0.0.1")]
    for kit in ("coordinator", "hospital0", "hospital1", "researcher"):
        assert (kits / kit / "ca.crt").read_bytes() == (kits / "ca" / "ca.crt").read_bytes()
    left = server.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    assert dt.timedelta(days=364) < left <= dt.timedelta(days=365)


def test_the_ca_key_is_only_in_the_ca_folder(kits):
    ca_key = (kits / "ca" / "ca.key").read_bytes()
    for path in kits.rglob("*"):
        if path.is_file() and path.parent != kits / "ca":
            assert path.name != "ca.key" and ca_key not in path.read_bytes(), path


def test_readmes_carry_the_fingerprints_of_the_files(kits):
    cert_fp = "SHA256:" + hashlib.sha256(_cert(kits / "ca" / "ca.crt").public_bytes(serialization.Encoding.DER)).hexdigest()
    assert cert_fp == "SHA256:" + _cert(kits / "ca" / "ca.crt").fingerprint(hashes.SHA256()).hex()
    server_fp = "SHA256:" + _cert(kits / "coordinator" / "server.pem").fingerprint(hashes.SHA256()).hex()
    log_fp = read_vkey_file(kits / "coordinator" / "audit-keys" / "fedsilo-coordinator.vkey").fingerprint
    coordinator_readme = (kits / "coordinator" / "README.md").read_text()
    for site in ("hospital0", "hospital1"):
        type_and_key = b" ".join((kits / site / "node.pub").read_bytes().split()[:2])
        node_fp = "SHA256:" + hashlib.sha256(type_and_key).hexdigest()
        witness_fp = read_vkey_file(kits / site / "witness" / f"{site}-witness.vkey").fingerprint
        site_readme = (kits / site / "README.md").read_text()
        for fp in (cert_fp, log_fp, node_fp, witness_fp):
            assert fp in site_readme and fp in coordinator_readme
        assert server_fp not in site_readme  # sites trust the CA, not one certificate
    assert server_fp in coordinator_readme
    assert read_vkey_file(kits / "hospital0" / "officers" / "j.smith.vkey").fingerprint in (kits / "hospital0" / "README.md").read_text()
    assert cert_fp in (kits / "researcher" / "README.md").read_text() and cert_fp in (kits / "ca" / "README.md").read_text()
    # No README holds key material.
    for readme in kits.rglob("README.md"):
        assert "PRIVATE KEY" not in readme.read_text()


def test_keys_are_cross_installed(kits):
    log_vkey = (kits / "coordinator" / "audit-keys" / "fedsilo-coordinator.vkey").read_text()
    for site in ("hospital0", "hospital1"):
        assert (kits / site / "trust" / "fedsilo-coordinator.vkey").read_text() == log_vkey
        assert (kits / "coordinator" / "audit-trust" / f"{site}-witness.vkey").read_text() == (kits / site / "witness" / f"{site}-witness.vkey").read_text()
        assert (kits / "coordinator" / "sites" / f"{site}.pub").read_bytes() == (kits / site / "node.pub").read_bytes()
        assert yaml.safe_load((kits / site / "site-kit.yaml").read_text())["coordinator"] == "fl.example.org:9093"
    kit = load_coordinator_kit(kits / "coordinator")
    assert (kit.federation, kit.port, kit.sites) == ("test-fed", 9093, ("hospital0", "hospital1"))


def test_an_existing_kit_folder_is_not_overwritten_without_force(tmp_path):
    project = tmp_path / "project.yaml"
    project.write_text(yaml.safe_dump(PROJECT))
    assert fedsilo("provision", str(project), "--out", str(tmp_path / "kits")).returncode == 0
    before = (tmp_path / "kits" / "ca" / "ca.crt").read_bytes()
    assert_one_line_error(fedsilo("provision", str(project), "--out", str(tmp_path / "kits")), "already holds kit folder(s): ca, coordinator", "--force")
    assert (tmp_path / "kits" / "ca" / "ca.crt").read_bytes() == before
    done = fedsilo("provision", str(project), "--out", str(tmp_path / "kits"), "--force")
    assert done.returncode == 0 and "PRIVATE" not in done.stdout + done.stderr
    assert (tmp_path / "kits" / "ca" / "ca.crt").read_bytes() != before


BAD_PROJECTS = {
    "unknown_top_key": ({**PROJECT, "federaton": "x"}, "unknown key 'federaton'"),
    "bad_federation_name": ({**PROJECT, "federation": "Test Fed"}, "federation name 'Test Fed'"),
    "unknown_coordinator_key": ({**PROJECT, "coordinator": {**PROJECT["coordinator"], "tls": True}}, "coordinator: unknown key 'tls'"),
    "no_addresses": ({**PROJECT, "coordinator": {"addresses": [], "port": 9093}}, "coordinator.addresses"),
    "bad_address": ({**PROJECT, "coordinator": {"addresses": ["fl_example.org"], "port": 9093}}, "'fl_example.org' is neither"),
    "bad_port": ({**PROJECT, "coordinator": {"addresses": ["10.0.0.1"], "port": 70000}}, "coordinator.port"),
    "no_sites": ({**PROJECT, "sites": []}, "'sites' must list"),
    "duplicate_site": ({**PROJECT, "sites": [{"id": "hospital0"}, {"id": "hospital0"}]}, "site 'hospital0' is listed twice"),
    "bad_site_id": ({**PROJECT, "sites": [{"id": "Hospital_0"}]}, "site id 'Hospital_0'"),
    "reserved_site_id": ({**PROJECT, "sites": [{"id": "coordinator"}]}, "reserved"),
    "unknown_site_key": ({**PROJECT, "sites": [{"id": "hospital0", "officer": ["a"]}]}, "sites[0]: unknown key 'officer'"),
    "bad_officer": ({**PROJECT, "sites": [{"id": "hospital0", "officers": ["J Smith"]}]}, "officer name 'J Smith'"),
    "missing_port": ({**PROJECT, "coordinator": {"addresses": ["10.0.0.1"]}}, "'port' is missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_PROJECTS))
def test_bad_project_files_are_refused_naming_the_key(case):
    raw, needle = BAD_PROJECTS[case]
    with pytest.raises(ConfigError) as err:
        parse_project(raw, "project.yaml")
    assert needle in err.value.message and err.value.fix


def test_bad_project_on_the_command_line_is_one_line_exit_2(tmp_path):
    project = tmp_path / "project.yaml"
    project.write_text(yaml.safe_dump({**PROJECT, "sites": [{"id": "hospital0"}, {"id": "hospital0"}]}))
    assert_one_line_error(fedsilo("provision", str(project), "--out", str(tmp_path / "kits")), "listed twice", "fix:")
    assert not (tmp_path / "kits").exists()
    (tmp_path / "broken.yaml").write_text("federation: [unclosed\n")
    assert_one_line_error(fedsilo("provision", str(tmp_path / "broken.yaml"), "--out", str(tmp_path / "kits")), "not valid YAML")


def test_the_example_project_is_valid():
    project = load_project(REPO / "configs" / "project.example.yaml")
    assert project.dial_address == "fl.example.org:9093" and len(project.sites) == 3


def test_coordinator_refuses_to_start_without_tls(tmp_path):
    out = tmp_path / "kits"
    provision(parse_project(PROJECT), out)
    (out / "coordinator" / "server.key").unlink()
    assert_one_line_error(fedsilo("coordinator", "start", "--kit", str(out / "coordinator"), "--host", "127.0.0.1"),
                          "no server.key: refusing to run without TLS", "--insecure-dev")
    assert not (out / "coordinator" / "superlink-state.db").exists()


def test_a_certificate_expiring_within_30_days_warns_and_an_expired_one_is_refused(tmp_path):
    project = parse_project({**PROJECT, "coordinator": {**PROJECT["coordinator"], "certificate_days": 20}})
    provision(project, tmp_path)
    kit = load_coordinator_kit(tmp_path / "coordinator")
    warnings: list[str] = []
    check_tls(kit, report=warnings.append)
    assert len(warnings) == 1 and "server certificate" in warnings[0] and "19 days left" in warnings[0]
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=21)
    with pytest.raises(ConfigError, match="expired on"):
        pki.expiry_warning(kit.server_cert, "server certificate", now=later)
    assert pki.expiry_warning(kit.ca_cert, "CA certificate") is None


def test_renew_cert_issues_a_new_server_certificate_from_the_same_ca(tmp_path):
    provision(parse_project(PROJECT), tmp_path / "a")
    provision(parse_project(PROJECT), tmp_path / "b")
    kit = load_coordinator_kit(tmp_path / "a" / "coordinator")
    old = pki.certificate_fingerprint(kit.server_cert)
    new = renew_server_certificate(kit, tmp_path / "a" / "ca", days=90)
    assert new != old and new == pki.certificate_fingerprint(kit.server_cert)
    assert pki.certificate_fingerprint(tmp_path / "a" / "coordinator" / "server.pem.old") == old
    _cert(kit.server_cert).verify_directly_issued_by(_cert(kit.ca_cert))
    assert set(pki.certificate_sans(kit.server_cert)) == {"fl.example.org", "203.0.113.10", "127.0.0.1", "localhost"}
    assert stat.S_IMODE(kit.server_key.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="is not the CA of"):
        renew_server_certificate(kit, tmp_path / "b" / "ca")


def test_status_of_a_coordinator_never_started_says_how_to_start_it(kits):
    assert_one_line_error(fedsilo("coordinator", "status", "--kit", str(kits / "coordinator")), "has not been started", "coordinator start")


def test_cli_config_points_the_operators_commands_at_loopback_with_the_kit_ca(tmp_path):
    import tomllib

    provision(parse_project(PROJECT), tmp_path)
    kit = load_coordinator_kit(tmp_path / "coordinator")
    home = write_cli_config(kit, "0.0.0.0", 9093, insecure=False)
    config = tomllib.loads((home / "config.toml").read_text())
    assert config["superlink"]["default"] == "test-fed"
    assert config["superlink"]["test-fed"] == {"address": "127.0.0.1:9093", "root-certificates": str(kit.ca_cert)}


def test_names_shared_with_modules_the_coordinator_may_not_import():
    """The coordinator cannot import the silo agent or the loopback federation: the names it repeats must agree."""
    from coordinator import deployment, provision as prov, submit
    from coordinator.progress import PROGRESS_PREFIX
    from coordinator.server_app import COORDINATOR_DIR_ENV, NODE_AUTH_ENV
    from silo_agent import node, site, witnessing

    assert prov.witness_key_name("hospital7") == witnessing.witness_key_name("hospital7")
    assert prov.NAME_RE.pattern == site.NAME_RE.pattern
    assert (prov.SITE_KIT_FORMAT, prov.SITE_KIT_FILE) == (node.SITE_KIT_FORMAT, node.SITE_KIT_FILE)
    assert deployment.COORDINATOR_DIR_ENV == COORDINATOR_DIR_ENV
    assert deployment.NODE_AUTH_ENV == NODE_AUTH_ENV
    assert submit.PROGRESS_PREFIX == PROGRESS_PREFIX


def test_status_table_names_sites_flags_unknown_nodes_and_lists_runs():
    from coordinator.deployment import format_status

    status = {"federation": "test-fed", "online": 1, "unknown_online": 1, "runs": [
                  {"run_id": "42", "status": "finished:completed", "elapsed_s": 43.4, "started": "2025-06-02 10:02:11Z", "finished": None}],
              "sites": [{"site": "hospital0", "node_id": 7, "status": "online", "online_at": "2025-06-02 09:14:03Z", "offline_at": None},
                        {"site": "hospital1", "node_id": None, "status": "not registered", "online_at": None, "offline_at": None},
                        {"site": None, "node_id": 9, "status": "online", "online_at": "2025-06-02 09:20:00Z", "offline_at": None}]}
    lines = format_status(status).splitlines()
    assert lines[0] == "federation test-fed: 1 of 2 site(s) online; 1 node(s) online that this kit did not register (UNKNOWN NODE below)"
    assert lines[2].split() == ["hospital0", "online", "7", "2025-06-02", "09:14:03Z"]
    assert lines[3].split() == ["hospital1", "not", "registered", "-"]
    assert lines[4].startswith("UNKNOWN NODE") and "9" in lines[4].split()
    assert lines[-1].split() == ["42", "finished:completed", "43", "s", "2025-06-02", "10:02:11Z"]


def test_rotate_audit_key_replaces_the_key_and_runs_signed_by_either_key_verify(tmp_path):
    """After the rotation the kit signs with a new key, the old private key is gone from the kit, and
    audit-trust/ verifies a run signed before the rotation and one signed after; a site given the new public key
    trusts it at its next start and keeps the old one beside it."""
    import shutil

    from compliance import AuditLog, verify_log
    from compliance.keys import load_verifier_keys
    from fedsilo.protocol import COORDINATOR_LOG_KEY
    from silo_agent.node import install_kit, load_site_kit

    provision(parse_project(PROJECT), tmp_path / "k")
    kit_dir = tmp_path / "k" / "coordinator"
    site_dir = tmp_path / "site0"
    install_kit(load_site_kit(tmp_path / "k" / "hospital0"), site_dir, report=lambda _: None)
    old = load_signer(kit_dir / "audit-keys", COORDINATOR_LOG_KEY)
    old_pem = (kit_dir / "audit-keys" / "fedsilo-coordinator.key").read_bytes()
    actor = {"kind": "coordinator", "id": "coordinator", "site": None, "role": "aggregator", "key": None}

    def signed_run(name: str, signer) -> Path:
        with AuditLog.open(tmp_path / name, origin=f"fedsilo.coordinator/{name}", signer=signer, source="coordinator") as log:
            log.append("run.started", actor=actor, run_id=name)
            log.sign_checkpoint()
        return tmp_path / name

    before = signed_run("run-before", old)
    done = fedsilo("coordinator", "rotate-audit-key", "--kit", str(kit_dir))
    assert done.returncode == 0 and done.stderr == "", done.stderr
    new = load_signer(kit_dir / "audit-keys", COORDINATOR_LOG_KEY)
    assert new.fingerprint != old.fingerprint and new.fingerprint in done.stdout and old.fingerprint in done.stdout
    assert stat.S_IMODE((kit_dir / "audit-keys" / "fedsilo-coordinator.key").stat().st_mode) == 0o600
    assert not [p for p in kit_dir.rglob("*") if p.is_file() and p.read_bytes() == old_pem]
    trusted = {k.fingerprint for k in load_verifier_keys(kit_dir / "audit-trust")}
    assert {old.fingerprint, new.fingerprint} <= trusted
    after = signed_run("run-after", new)
    for run in (before, after):
        verify_log(run, keys=kit_dir / "audit-trust")  # raises at the first problem
    with pytest.raises(VerificationError, match="trusted"):  # the retired key's public half is what lets the old run verify
        verify_log(before, keys=[new.verifier])
    # The site: the new public key in its kit's trust/, then its next start.
    shared = kit_dir / "audit-trust" / "fedsilo-coordinator.vkey"
    shutil.copyfile(shared, tmp_path / "k" / "hospital0" / "trust" / shared.name)
    install_kit(load_site_kit(tmp_path / "k" / "hospital0"), site_dir, report=lambda _: None)
    assert {k.fingerprint for k in load_verifier_keys(site_dir / "trust")} == {old.fingerprint, new.fingerprint}


def test_rotate_audit_key_without_a_key_is_one_line_exit_2(tmp_path):
    import shutil

    provision(parse_project(PROJECT), tmp_path / "k")
    shutil.rmtree(tmp_path / "k" / "coordinator" / "audit-keys")
    assert_one_line_error(fedsilo("coordinator", "rotate-audit-key", "--kit", str(tmp_path / "k" / "coordinator")),
                          "has no checkpoint key audit-keys/fedsilo-coordinator.key", "fix:")


def test_rotate_audit_key_run_again_finishes_an_interrupted_rotation(tmp_path):
    from compliance.keys import generate_signer, load_verifier_keys
    from fedsilo.protocol import COORDINATOR_LOG_KEY

    provision(parse_project(PROJECT), tmp_path / "k")
    kit_dir = tmp_path / "k" / "coordinator"
    old = load_signer(kit_dir / "audit-keys", COORDINATOR_LOG_KEY)
    # Stopped between the two renames: the old folder moved aside, the new pair not yet in place.
    new = generate_signer(kit_dir / "audit-keys.new", COORDINATOR_LOG_KEY, role="log")
    (kit_dir / "audit-keys").rename(kit_dir / "audit-keys.old")
    done = fedsilo("coordinator", "rotate-audit-key", "--kit", str(kit_dir))
    assert done.returncode == 0, done.stderr
    assert f"finished an interrupted rotation: the checkpoint key is {new.fingerprint}" in done.stdout
    assert load_signer(kit_dir / "audit-keys", COORDINATOR_LOG_KEY).fingerprint == new.fingerprint
    assert not (kit_dir / "audit-keys.old").exists() and not (kit_dir / "audit-keys.new").exists()
    assert {k.fingerprint for k in load_verifier_keys(kit_dir / "audit-trust")} >= {old.fingerprint, new.fingerprint}
    # Stopped before the swap: the half-made pair is dropped and the rotation made afresh.
    stale = generate_signer(kit_dir / "audit-keys.new", COORDINATOR_LOG_KEY, role="log")
    done = fedsilo("coordinator", "rotate-audit-key", "--kit", str(kit_dir))
    assert done.returncode == 0, done.stderr
    latest = load_signer(kit_dir / "audit-keys", COORDINATOR_LOG_KEY).fingerprint
    assert latest not in (new.fingerprint, stale.fingerprint, old.fingerprint) and f"new checkpoint key {latest}" in done.stdout
    assert read_vkey_file(kit_dir / "audit-trust" / "fedsilo-coordinator.vkey").fingerprint == latest


def test_rotate_audit_key_run_again_after_audit_trust_could_not_be_written_keeps_the_old_public_key(tmp_path, monkeypatch):
    # The key was swapped but audit-trust/ was not updated (disk full, say): the rerun finishes publishing, and
    # the old public key is kept, so runs it signed still verify.
    from compliance.keys import load_verifier_keys
    from coordinator import deployment
    from fedsilo.protocol import COORDINATOR_LOG_KEY

    provision(parse_project(PROJECT), tmp_path / "k")
    kit_dir = tmp_path / "k" / "coordinator"
    old = load_signer(kit_dir / "audit-keys", COORDINATOR_LOG_KEY)
    publish, calls = deployment._publish, []

    def failing_publish(trust, stem, before, after):
        calls.append(after)
        if before != after:  # the last step: publishing the new key
            raise OSError(28, "No space left on device")
        publish(trust, stem, before, after)

    monkeypatch.setattr(deployment, "_publish", failing_publish)
    with pytest.raises(ConfigError, match="No space left on device.*run 'fedsilo coordinator rotate-audit-key' again"):
        deployment.rotate_audit_key(load_coordinator_kit(kit_dir))
    monkeypatch.setattr(deployment, "_publish", publish)
    new = load_signer(kit_dir / "audit-keys", COORDINATOR_LOG_KEY)
    assert new.fingerprint != old.fingerprint and calls == [new.verifier]  # it failed publishing the new key
    done = deployment.rotate_audit_key(load_coordinator_kit(kit_dir))
    assert done.finished_interrupted and (done.old, done.new) == (old.fingerprint, new.fingerprint)
    assert {k.fingerprint for k in load_verifier_keys(kit_dir / "audit-trust")} >= {old.fingerprint, new.fingerprint}
    assert read_vkey_file(kit_dir / "audit-trust" / "fedsilo-coordinator.vkey").fingerprint == new.fingerprint
