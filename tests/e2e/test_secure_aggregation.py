"""SecAgg+ and compressed updates through a real SuperLink and four SuperNodes with TLS on loopback.

Run 1: every silo takes part; the model the coordinator applies equals the plain weighted mean of the
silos' (clipped, DP) updates within the quantization bound, and nothing the coordinator wrote holds any
single silo's update. Run 2: top-k compressed updates (5%, error feedback kept at the silos) with the
trimmed mean: what each silo sent is what the coordinator received and decoded. Run 3: one silo is
killed after it shared its keys (while it trains, in the collect stage); the round still completes with
the other three (the reconstruction threshold is 3 of 4), their mean is applied, and the audit log names
the stage at which the silo dropped.
"""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from compliance import AuditLog, verify_log
from coordinator.secure_round import MAX_WEIGHT, quantization_error_bound, secagg_parameters
from conftest import E2E_PLAN
from fedsilo.demo import sign_and_approve
from fedsilo.local_federation import LocalFederation, SiloSpec
from pipelines.networks import build_network
from pipelines.plan import load_plan
from pipelines.serialization import l2_norm, load_model, state_digest, to_numpy
from silo_agent.outbox import load_update

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e-a")]  # one worker runs a group in turn

BOUND = 1.0


def _events(path: Path, event: str) -> list[dict]:
    with AuditLog.open(path, create=False) as log:
        return [r for r in log.records() if r["event"] == event]


def _sent(site, run_id: str, plan) -> tuple[dict[str, np.ndarray], float]:
    """The update a silo sent in round 1 of ``run_id`` (its outbox), and its weight."""
    [record] = [r for r in _events(site.audit_dir, "update.sent") if r["run_id"] == run_id]
    initial = to_numpy(build_network(plan, seed=plan.training.seed).state_dict())
    payload, metrics = load_update(site.root, run_id, 1, state_digest(initial))
    assert state_digest(payload) == record["object"]["sha256"]
    return payload, min(float(metrics["num-examples"]), MAX_WEIGHT)


def _applied(out: Path, plan) -> dict[str, np.ndarray]:
    """The aggregate the coordinator applied in round 1 (server lr 1: model after - initial model)."""
    initial = to_numpy(build_network(plan, seed=plan.training.seed).state_dict())
    after = load_model(out / "model.safetensors")
    return {k: after[k] - initial[k] for k in initial}


def _check_mean(out: Path, plan, sites, run_id: str) -> float:
    updates = [_sent(s, run_id, plan) for s in sites]
    total = sum(w for _, w in updates)
    mean = {k: sum(u[k].astype(np.float64) * w for u, w in updates) / total for k in updates[0][0]}
    applied = _applied(out, plan)
    diff = max(float(np.max(np.abs(applied[k] - mean[k]))) for k in mean)
    bound = quantization_error_bound(secagg_parameters(4, BOUND), [w for _, w in updates])
    # float32 model arithmetic (initial + aggregate, then the difference) adds a few ulp of the weights
    assert diff <= bound + 2e-6, f"secure mean differs from the plain weighted mean by {diff:.3g} (bound {bound:.3g})"
    scale = max(float(np.max(np.abs(m))) for m in mean.values())
    assert scale > 100 * (bound + 2e-6), "the updates are too small for the comparison to mean anything"
    for u, _ in updates:  # each silo clipped its own update before masking
        assert l2_norm(u) <= BOUND * (1 + 1e-5)
    return diff


def test_secure_aggregation_equals_the_weighted_mean_and_survives_a_dropout(tmp_path, make_sites):
    raw = copy.deepcopy(E2E_PLAN)
    raw["federation"].update({"rounds": 1, "min_silos": 3, "secure_aggregation": "secagg+", "update_norm_bound": BOUND,
                              "round_timeout_s": 240, "wait_for_silos_s": 90})
    plan_path = tmp_path / "plan.yaml"
    plan_path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    plan = load_plan(plan_path)
    sites, _ = make_sites(tmp_path, [12, 12, 14, 16])
    bundle = sign_and_approve(tmp_path, plan_path, sites)
    compressed = copy.deepcopy(E2E_PLAN)
    compressed["federation"].update({"rounds": 1, "min_silos": 3, "compression": "topk", "topk_fraction": 0.05,
                                     "aggregation": {"rule": "trimmed_mean", "args": {"beta": 0.25}}})
    compressed_path = tmp_path / "compressed" / "plan.yaml"
    compressed_path.parent.mkdir()
    compressed_path.write_text(yaml.safe_dump(compressed), encoding="utf-8")
    compressed_bundle = sign_and_approve(tmp_path, compressed_path, sites)
    for s in sites:  # three plans at epsilon 8 each: more than the default lifetime budget of 20
        policy = s.root / "policy.yaml"
        policy.write_text(policy.read_text().replace("lifetime_epsilon_per_dataset: 20.0", "lifetime_epsilon_per_dataset: 40.0"))
    out1, out2, outc = tmp_path / "run1", tmp_path / "run2", tmp_path / "run-topk"
    with LocalFederation(tmp_path, [SiloSpec(s.site_id, s.root) for s in sites]) as fed:
        fed.run_plan(bundle, out1, timeout_s=900)
        fed.run_plan(compressed_bundle, outc, timeout_s=900)
        victim = sites[3]
        seen = len(_events(victim.audit_dir, "plan.received"))
        killed = threading.Event()

        def kill_when_training() -> None:  # plan.received is the silo's first record of the collect stage
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline and not killed.is_set():
                if len(_events(victim.audit_dir, "plan.received")) > seen:
                    fed.stop_silo(victim.site_id, kill=True)
                    killed.set()
                    return
                time.sleep(0.2)

        watcher = threading.Thread(target=kill_when_training, daemon=True)
        watcher.start()
        fed.run_plan(bundle, out2, timeout_s=900)
        watcher.join(timeout=5)
        assert killed.is_set(), "the silo was never seen training in run 2"

    # Run 1: all four in the sum; the applied aggregate is their weighted mean.
    run1 = _events(out1 / "audit", "run.started")[0]["run_id"]
    _check_mean(out1, plan, sites, run1)
    [agg] = _events(out1 / "audit", "aggregate.computed")
    assert agg["details"]["secure_aggregation"] == "secagg+"
    assert agg["details"]["input_sites"] == sorted(s.site_id for s in sites) and agg["details"]["dropped_nodes"] == []
    assert "inputs" not in agg["details"] and len(agg["details"]["aggregate_sha256"]) == 64
    received = _events(out1 / "audit", "update.received")
    assert len(received) == 4 and all(r["object"]["sha256"] is None and r["details"]["masked"] for r in received)
    assert all("l2_norm" not in r["details"] for r in received)
    # Nothing the coordinator wrote holds a single silo's update: no digest, no run of its bytes.
    sent_digests = {r["object"]["sha256"] for s in sites for r in _events(s.audit_dir, "update.sent")}
    coordinator_text = b"".join(p.read_bytes() for p in out1.rglob("*") if p.is_file())
    for digest in sent_digests:
        assert digest.encode() not in coordinator_text
    for s in sites:
        update, _ = _sent(s, run1, plan)
        biggest = max(update.values(), key=lambda a: a.size)
        assert biggest.size >= 64
        for start in range(0, biggest.size - 16, max(1, biggest.size // 8)):
            assert biggest.ravel()[start:start + 16].tobytes() not in coordinator_text

    # Run 2 (top-k): each update the coordinator received is the one a silo sent, a twentieth of the dense bytes.
    received = _events(outc / "audit", "update.received")
    assert len(received) == 4 and {r["details"]["compression"] for r in received} == {"topk"}
    sent = {(r["round"], r["object"]["sha256"]): r for s in sites for r in _events(s.audit_dir, "update.sent")
            if r["details"].get("compression") == "topk"}
    for r in received:
        assert (r["round"], r["object"]["sha256"]) in sent
        assert r["details"]["bytes"] <= 0.11 * r["details"]["dense_bytes"]  # 5% of the entries: values and indices
    assert [a["details"]["rule"] for a in _events(outc / "audit", "aggregate.computed")] == ["trimmed_mean"]
    assert all(any((s.root / "outbox").rglob("residual-0001.safetensors")) for s in sites)

    # Run 3: the killed silo dropped after sharing its keys; the other three make the round.
    run2 = _events(out2 / "audit", "run.started")[0]["run_id"]
    _check_mean(out2, plan, sites[:3], run2)
    [agg] = _events(out2 / "audit", "aggregate.computed")
    assert agg["details"]["input_sites"] == sorted(s.site_id for s in sites[:3])
    [dropped] = agg["details"]["dropped_nodes"]
    assert dropped["stage"] == "collect-masked-vectors"
    missing = _events(out2 / "audit", "update.missing")
    assert len(missing) == 1 and "stage collect-masked-vectors" in missing[0]["reason"]
    for out, witnesses in ((out1, sites), (out2, sites[:3])):  # each log verifies, the silos that evaluated as witnesses
        result = verify_log(out / "audit", keys=tmp_path / "pki" / "audit-trust", witnesses=[s.audit_dir for s in witnesses])
        assert result.signatures_checked and len(result.witnesses) == len(witnesses)
