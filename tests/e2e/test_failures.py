"""What real networks and machines do to a federation, staged with real processes on loopback.

- A silo killed mid-round: the round completes with the others (min_silos still met), the missing
  reply is audited, and the silo, restarted with the same key and site folder, rejoins the next round
  with its privacy ledger and accountant state intact.
- A silo that stops answering (SIGSTOP): the round times out after the plan's round_timeout_s and goes on.
- The coordinator's ServerApp killed mid-run: ``resume`` continues from the last completed round with
  that round's global model, in the same run folder and audit log; silos answer the retried round
  from their outbox, so no privacy spend is counted twice; the audit log verifies.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from compliance import AuditLog, verify_log
from fedsilo.demo import sign_and_approve
from fedsilo.local_federation import LocalFederation, SiloSpec
from fedsilo.processes import descendant_pids
from pipelines.serialization import load_model, state_digest
from pipelines.training import composed_epsilon
from silo_agent.ledger import PrivacyLedger

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e-b")]

# Long enough for a healthy silo on a busy 2-core machine, short enough to wait for twice in a test.
ROUND_TIMEOUT_S = 60


def _plan(tmp_path: Path, base: dict, *, rounds: int, min_silos: int, round_timeout_s: float = ROUND_TIMEOUT_S) -> Path:
    raw = json.loads(json.dumps(base))
    raw["federation"].update({"rounds": rounds, "min_silos": min_silos, "round_timeout_s": round_timeout_s})
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _events(audit_dir: Path, event: str) -> list[dict]:
    with AuditLog.open(audit_dir, create=False) as log:
        return [r for r in log.records() if r["event"] == event]


def _wait_for(audit_dir: Path, event: str, round_: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if any(r["round"] == round_ for r in _events(audit_dir, event)):
                return
        except Exception:  # noqa: BLE001 - the silo may not have created its log yet
            pass
        time.sleep(0.2)
    raise AssertionError(f"no {event} for round {round_} in {audit_dir} within {timeout_s} s")


def _signal_clientapps(fed: LocalFederation, site: str, sig: int) -> None:
    """Signal the processes running ``site``'s ClientApp (its warm executor and the messages forked from it)."""
    executor = fed.executors[site]
    for pid in [executor.pid, *descendant_pids(executor.pid)]:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def test_killed_and_silent_silos_do_not_stop_the_run(tmp_path, make_sites):
    from conftest import E2E_PLAN

    sites, _ = make_sites(tmp_path, [24, 24, 24])
    # Enough rounds for the restarted silo to be accepted again (its old key's heartbeats must lapse first: about 20 s,
    # a few rounds of this plan) and for a hang after that.
    rounds = 8
    bundle = sign_and_approve(tmp_path, _plan(tmp_path, E2E_PLAN, rounds=rounds, min_silos=2), sites)
    by_name = {s.site_id: s for s in sites}
    rows: list[dict] = []
    frozen: list[int] = []

    def trained(row: dict) -> set[str]:
        return {site for site, m in row["sites"].items() if "num_examples" in m}

    with LocalFederation(tmp_path, [SiloSpec(s.site_id, s.root) for s in sites], isolation="warm") as fed:
        def on_round(row: dict) -> None:
            rows.append(row)
            if row["round"] == 1:
                # hospital2 receives round 2 and crashes while training; it is restarted (same key, same site folder)
                # and accepted again once the coordinator has seen its heartbeats lapse.
                _wait_for(by_name["hospital2"].audit_dir, "plan.received", 2)
                fed.stop_silo("hospital2", kill=True)
                fed.start_silo("hospital2", rejoin_timeout_s=120)
            elif frozen and row["round"] == frozen[0]:
                _signal_clientapps(fed, "hospital1", signal.SIGCONT)  # the hang is over: later rounds need not wait it out
            elif row["round"] >= 3 and "hospital2" in trained(row) and not frozen and row["round"] < rounds:
                # Once hospital2 is back, hospital1's ClientApp receives the next round, then hangs: no reply, no
                # crash (its SuperNode stays up).
                _wait_for(by_name["hospital1"].audit_dir, "plan.received", row["round"] + 1)
                _signal_clientapps(fed, "hospital1", signal.SIGSTOP)
                frozen.append(row["round"] + 1)

        try:
            fed.run_plan(bundle, tmp_path / "run", on_round=on_round, timeout_s=900)
        finally:
            _signal_clientapps(fed, "hospital1", signal.SIGCONT)

    assert [r["round"] for r in rows] == list(range(1, rounds + 1))
    assert trained(rows[0]) == {"hospital0", "hospital1", "hospital2"}
    assert trained(rows[1]) == {"hospital0", "hospital1"}  # the round completed without the crashed silo
    rejoined = min(r["round"] for r in rows if r["round"] > 2 and "hospital2" in trained(r))  # and it came back
    [hung] = frozen
    assert hung > rejoined and trained(rows[hung - 1]) == {"hospital0", "hospital2"}  # the hung one was left behind
    # Neither the crashed silo nor the hung ClientApp answered: each was waited out (the plan's round timeout)
    # or reported by Flower (the SuperLink for a node whose heartbeats stopped, the SuperNode for a task whose
    # heartbeats stopped), whichever came first, and the round went on without it.
    audit = tmp_path / "run" / "audit"
    missing = {(r["round"], r["details"]["site"]) for r in _events(audit, "update.missing")}
    failed = {(r["round"], r["details"]["site"]) for r in _events(audit, "update.rejected")}
    assert (2, "hospital2") in missing | failed
    assert (hung, "hospital1") in missing | failed

    # The restarted silo kept its ledger and accountant state: the epsilon it reported in the last round
    # composes every spend on record, including those from before the crash.
    with PrivacyLedger.for_site(by_name["hospital2"].privacy_dir) as ledger:
        spends = ledger.spends("synthetic")
        history = ledger.history("synthetic")
    rounds_spent = [s.round for s in spends]
    assert len(rounds_spent) == len(set(rounds_spent)) and {1, rejoined} <= set(rounds_spent)
    reported = rows[-1]["sites"]["hospital2"]["epsilon"]
    assert reported == pytest.approx(composed_epsilon(history, delta=1e-5, accountant=spends[-1].accountant), rel=1e-6)
    assert reported > rows[0]["sites"]["hospital2"]["epsilon"]


def test_a_killed_coordinator_resumes_from_the_last_round(tmp_path, make_sites):
    from conftest import E2E_PLAN

    sites, _ = make_sites(tmp_path, [24, 24])
    bundle = sign_and_approve(tmp_path, _plan(tmp_path, E2E_PLAN, rounds=3, min_silos=2, round_timeout_s=300), sites)
    run_dir = tmp_path / "run"
    rows: list[dict] = []

    class Crashed(Exception):
        pass

    with LocalFederation(tmp_path, [SiloSpec(s.site_id, s.root) for s in sites], isolation="warm") as fed:
        def crash_after_round_2_trained(row: dict) -> None:
            rows.append(row)
            if row["round"] == 1:
                for site in sites:  # round 2's message reached both silos: the ServerApp now waits for their replies
                    _wait_for(site.audit_dir, "dataset.used", 2)
                [pid] = fed.serverapp_pids()
                os.kill(pid, signal.SIGSTOP)  # so it cannot take them and checkpoint round 2 before the crash
                for site in sites:  # both silos trained round 2 and spent for it: the crash comes after
                    _wait_for(site.audit_dir, "update.sent", 2)
                os.kill(pid, signal.SIGKILL)
                raise Crashed

        with pytest.raises(Crashed):
            fed.run_plan(bundle, run_dir, on_round=crash_after_round_2_trained, timeout_s=600)
        model_after_round_1 = state_digest(load_model(run_dir / "model.safetensors"))
        fed.resume_run(run_dir, on_round=rows.append, timeout_s=600)

    assert [r["round"] for r in rows] == [1, 2, 3]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]  # each round once
    [resumed] = _events(run_dir / "audit", "run.resumed")
    assert resumed["details"]["after_round"] == 1 and resumed["object"]["sha256"] == model_after_round_1
    assert len(_events(run_dir / "audit", "run.started")) == 1
    saved = _events(run_dir / "audit", "state.saved")
    assert [r["round"] for r in saved] == [1, 2, 3]
    for site in sites:
        with PrivacyLedger.for_site(site.privacy_dir) as ledger:
            assert [sp.round for sp in ledger.spends("synthetic")] == [1, 2, 3]  # nothing counted twice
        [resent] = _events(site.audit_dir, "update.resent")
        assert resent["round"] == 2
    result = verify_log(run_dir / "audit", keys=tmp_path / "pki" / "audit-trust", witnesses=[s.audit_dir for s in sites])
    assert result.signatures_checked and result.unanchored == 0 and len(result.witnesses) == 2
