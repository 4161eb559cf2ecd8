"""Two silos, two rounds, through a real SuperLink and SuperNodes with TLS on loopback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from compliance import AuditLog, verify_log
from compliance.keys import read_vkey_file
from fedsilo.protocol import COORDINATOR_LOG_KEY
from fedsilo.local_federation import LocalFederation, SiloSpec
from pipelines.networks import build_network
from pipelines.plan import load_plan
from pipelines.serialization import load_model
from silo_agent.witnessing import witness_fingerprint

pytestmark = pytest.mark.e2e


def _events(path, event):
    with AuditLog.open(path, create=False) as log:
        return [r for r in log.records() if event is None or r["event"] == event]


def test_two_silos_two_rounds_with_tls(tmp_path, e2e_plan, make_sites):
    sites, synthetic = make_sites(tmp_path, [30, 36])
    out = tmp_path / "run"
    rows = []
    with LocalFederation(tmp_path, [SiloSpec(s.site_id, s.root) for s in sites]) as fed:
        pids = [p.pid for p in fed.procs.processes]
        fed.run_plan(e2e_plan, out, on_round=rows.append, timeout_s=900)
    # Every process we started is gone.
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    plan = load_plan(e2e_plan)
    assert [r["round"] for r in rows] == [1, 2]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for r in metrics["rounds"]:
        assert set(r["sites"]) == {"hospital0", "hospital1"}
        for m in r["sites"].values():
            assert 0.0 <= m["dice"] <= 1.0 and m["epsilon"] > 0
    for site in ("hospital0", "hospital1"):
        eps = [r["sites"][site]["epsilon"] for r in metrics["rounds"]]
        assert eps[0] < eps[1] <= plan.privacy.target_epsilon * 1.01  # composed, within the plan's budget
    assert set(metrics["final"]["dice_per_site"]) == {"hospital0", "hospital1"}

    # The saved model is tensors only and fits the plan's network.
    state = load_model(out / "model.safetensors")
    assert set(state) == set(build_network(plan).state_dict())

    # The coordinator's log verifies against its key, with every silo as a witness: a checkpoint signed at
    # each round end and cosigned by both silos, and one at run end that anchors the tail.
    result = verify_log(out / "audit", keys=tmp_path / "pki" / "audit-trust", witnesses=[s.audit_dir for s in sites])
    assert result.signatures_checked and result.unanchored == 0
    assert len(result.witnesses) == 2
    cosigned = _events(out / "audit", "checkpoint.cosigned")
    assert len([e for e in cosigned if e["outcome"] == "success"]) == 4  # 2 silos x 2 rounds
    # Every update a silo sent is the one the coordinator received.
    received = {(r["round"], r["object"]["sha256"]) for r in _events(out / "audit", "update.received")}
    assert len(received) == 4
    # Every record names who acted, in which role, with which key, and which component wrote it.
    coordinator_key = read_vkey_file(tmp_path / "pki" / "audit" / f"{COORDINATOR_LOG_KEY}.vkey").fingerprint
    for record in _events(out / "audit", None):
        assert record["actor"]["role"] == "aggregator" and record["actor"]["key"] == coordinator_key
        assert record["source"].startswith("coordinator@")
    sent = set()
    for s in sites:
        verify_log(s.audit_dir)
        silo_records = [r for r in _events(s.audit_dir, None) if r["actor"]["kind"] == "silo"]
        assert silo_records and {r["actor"]["key"] for r in silo_records} == {witness_fingerprint(s.root, s.site_id)}
        registered = _events(s.audit_dir, "dataset.registered")
        assert len(registered) == 1 and registered[0]["actor"]["role"] == "hospital-it"
        sent |= {(r["round"], r["object"]["sha256"]) for r in _events(s.audit_dir, "update.sent")}
        spends = _events(s.audit_dir, "dp.spent")
        assert [r["round"] for r in spends] == [1, 2]
    assert sent == received

    # No PHI planted in the DICOM headers appears in anything the coordinator, the silos (site folders,
    # pixel cache, audit logs, ledgers) or the Flower processes (logs, state databases) wrote.
    phi = {v for silo in synthetic for v in silo.planted_phi if len(v) >= 4}
    source_data = tmp_path / "data"
    for path in tmp_path.rglob("*"):
        if path.is_file() and source_data not in path.parents:
            data = path.read_bytes()
            leaked = [v for v in phi if v.encode() in data]
            assert not leaked, f"{path} holds planted PHI"


def test_a_silo_that_cannot_join_fails_the_start_and_nothing_is_left_running(tmp_path, make_sites):
    from fedsilo.errors import DeploymentError

    sites, _ = make_sites(tmp_path, [4, 4])
    specs = [SiloSpec(sites[0].site_id, sites[0].root), SiloSpec(sites[1].site_id, sites[1].root, register=False)]
    federation = LocalFederation(tmp_path, specs)
    with pytest.raises(DeploymentError, match="silo hospital1 failed to start"):
        with federation:
            pass
    assert federation.procs.processes, "the federation started nothing"
    for proc in federation.procs.processes:
        assert not proc.alive()
        with pytest.raises(ProcessLookupError):
            os.kill(proc.pid, 0)


@pytest.mark.parametrize("sig", ["SIGINT"])  # SIGTERM takes the same path (fedsilo.processes.ProcessSet)
def test_interrupting_the_demo_stops_every_process_it_started(tmp_path, sig):
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    demo = subprocess.Popen([sys.executable, "-m", "fedsilo.cli", "demo", "--out", str(out), "--sizes", "6,6", "--silos", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    for line in demo.stdout:
        if "federation up" in line or time.monotonic() > deadline:
            break
    demo.send_signal(getattr(signal, sig))
    assert demo.wait(timeout=60) == 130
    # No process of this run is left: the SuperLink, SuperNodes and every ServerApp/ClientApp they
    # spawned carry FLWR_HOME inside the run folder in their environment.
    leftovers = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if str(out).encode() in (proc / "environ").read_bytes() + (proc / "cmdline").read_bytes():
                    leftovers.append(proc.name)
            except OSError:
                continue
    assert not leftovers
