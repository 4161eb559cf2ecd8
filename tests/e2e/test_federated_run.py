"""Two silos, two rounds, through a real SuperLink and SuperNodes with TLS on loopback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from compliance import AuditLog, verify_log
from compliance.keys import read_vkey_file
from fedsilo.protocol import COORDINATOR_LOG_KEY
from fedsilo.local_federation import LocalFederation, SiloSpec
from pipelines.networks import build_network
from pipelines.plan import load_plan
from pipelines.serialization import load_model
from fedsilo.demo import sign_and_approve, sign_plan
from fedsilo.errors import DeploymentError
from file_access import FileAccessWatch
from silo_agent.ledger import PrivacyLedger
from silo_agent.witnessing import witness_fingerprint

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e-a")]  # one worker runs a group in turn


def _events(path, event):
    with AuditLog.open(path, create=False) as log:
        return [r for r in log.records() if event is None or r["event"] == event]


def test_two_silos_two_rounds_with_tls(tmp_path, e2e_plan, make_sites):
    sites, synthetic = make_sites(tmp_path, [30, 36])
    raw = yaml.safe_load(e2e_plan.read_text())
    raw["training"]["personalize"] = True  # each silo keeps its last round's model and reports it at the end
    e2e_plan.write_text(yaml.safe_dump(raw))
    bundle = sign_and_approve(tmp_path, e2e_plan, sites)  # researcher signs; each site's officer approves
    # The same plan with one value changed after approval: signed by the researcher, approved nowhere.
    altered = tmp_path / "altered" / "plan.yaml"
    altered.parent.mkdir()
    altered.write_text(e2e_plan.read_text().replace("local_epochs: 1", "local_epochs: 2"))
    altered_bundle = sign_plan(tmp_path, altered)
    out = tmp_path / "run"
    rows = []
    watch = FileAccessWatch(tmp_path / "data")
    try:
        with LocalFederation(tmp_path, [SiloSpec(s.site_id, s.root) for s in sites]) as fed:
            pids = [p.pid for p in fed.procs.processes]
            with pytest.raises(DeploymentError, match=r"round 1: 0 valid update\(s\) of 2 silo\(s\)"):
                fed.run_plan(altered_bundle, tmp_path / "refused-run", timeout_s=600)
            assert watch.drain() == [], "a refused plan opened patient files"  # what the kernel saw, any process
            fed.run_plan(bundle, out, on_round=rows.append, timeout_s=900)
            assert watch.drain(), "the approved run read no data: the file watch is not working"
            # hospital0 may now spend less than one more round: the next run is refused there before training.
            policy = sites[0].root / "policy.yaml"
            policy.write_text(policy.read_text().replace("lifetime_epsilon_per_dataset: 20.0", "lifetime_epsilon_per_dataset: 8.5"))
            with pytest.raises(DeploymentError, match=r"round 1: 1 valid update\(s\) of 2 silo\(s\)"):
                fed.run_plan(bundle, tmp_path / "over-budget-run", timeout_s=600)
    finally:
        watch.close()
    for s in sites:
        refusals = [r["reason"] for r in _events(s.audit_dir, "plan.refused")]
        assert any(f"plan {load_plan(altered).hash()[:12]} is not approved" in r for r in refusals)
    [budget_refusal] = [r for r in _events(sites[0].audit_dir, "plan.refused") if "privacy budget" in r["reason"]]
    assert "lifetime 8.5" in budget_refusal["reason"]
    with PrivacyLedger.for_site(sites[0].privacy_dir) as ledger:
        assert [sp.round for sp in ledger.spends("synthetic")] == [1, 2]  # nothing spent by the refused round
    # The SuperLink ran with fedsilo's long polling (fedsilo.flower_longpoll), token sweep (fedsilo.flower_housekeeping)
    # and middleware gate (fedsilo.flower_http),
    # as `fedsilo coordinator start` runs it.
    superlink_log = (tmp_path / "logs" / "superlink.log").read_text()
    assert "SuperLink long polling on" in superlink_log
    assert "SuperLink sweeps expired task tokens at most every 1 s" in superlink_log
    assert "without the Control API's middlewares; thread switch interval 1 ms" in superlink_log
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
    # training.personalize: each silo's own model, evaluated beside the global one, kept at the silo only.
    personal = metrics["final"]["personalized_dice_per_site"]
    assert set(personal) == {"hospital0", "hospital1"} and all(0.0 <= v <= 1.0 for v in personal.values())
    gains = metrics["final"]["personalization_gain_dice_per_site"]
    assert gains == pytest.approx({s: personal[s] - metrics["final"]["dice_per_site"][s] for s in personal})
    for site in sites:
        [kept] = (site.root / "models").glob("personalized-*.safetensors")
        assert set(load_model(kept)) == set(build_network(plan).state_dict())
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]

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
    run_id = _events(out / "audit", "run.started")[0]["run_id"]
    assert len(received) == 4
    # Each node's site is the one whose node key it authenticated with (not just what its replies claim).
    started = _events(out / "audit", "node.started")
    assert {r["details"]["site"] for r in started} == {"hospital0", "hospital1"}
    assert all("the coordinator kit's key of this site" in r["details"]["authenticated"] for r in started)
    # Every record names who acted, in which role, with which key, and which component wrote it.
    coordinator_key = read_vkey_file(tmp_path / "pki" / "audit" / f"{COORDINATOR_LOG_KEY}.vkey").fingerprint
    records = _events(out / "audit", None)
    submitted = records[0]
    assert submitted["event"] == "plan.submitted" and submitted["actor"]["role"] == "researcher"
    assert submitted["actor"]["key"] == read_vkey_file(tmp_path / "pki" / "researcher" / "demo-researcher.vkey").fingerprint
    for record in records[1:]:
        assert record["actor"]["role"] == "aggregator" and record["actor"]["key"] == coordinator_key
    assert all(record["source"].startswith("coordinator@") for record in records)
    sent = set()
    for s in sites:
        verify_log(s.audit_dir)
        silo_records = [r for r in _events(s.audit_dir, None) if r["actor"]["kind"] == "silo"]
        assert silo_records and {r["actor"]["key"] for r in silo_records} == {witness_fingerprint(s.root, s.site_id)}
        registered = _events(s.audit_dir, "dataset.registered")
        assert len(registered) == 1 and registered[0]["actor"]["role"] == "hospital-it"
        [approved] = _events(s.audit_dir, "plan.approved")
        assert approved["actor"]["role"] == "site-officer" and approved["object"]["sha256"] == plan.hash()
        plans_received = _events(s.audit_dir, "plan.received")
        assert plans_received and all(r["details"]["researcher"] == "demo-researcher" for r in plans_received)
        sent |= {(r["round"], r["object"]["sha256"]) for r in _events(s.audit_dir, "update.sent") if r["run_id"] == run_id}
        spends = _events(s.audit_dir, "dp.spent")
        # hospital1 had budget left and trained round 1 of the over-budget run; hospital0 refused it
        assert [r["round"] for r in spends] == ([1, 2] if s is sites[0] else [1, 2, 1])
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
