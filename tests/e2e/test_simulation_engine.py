"""The same plan through Flower's simulation engine (virtual SuperNodes, one site folder each)."""

from __future__ import annotations

import json

import pytest

from compliance import verify_log
from fedsilo.local_federation import SiloSpec
from fedsilo.demo import sign_and_approve
from fedsilo.local_simulation import LocalSimulation

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e-a")]  # one worker runs a group in turn


def test_simulation_engine_runs_the_plan_on_each_site_folder(tmp_path, e2e_plan, make_sites):
    sites, _ = make_sites(tmp_path, [12, 14])
    bundle = sign_and_approve(tmp_path, e2e_plan, sites)
    out = tmp_path / "run"
    with LocalSimulation(tmp_path, [SiloSpec(s.site_id, s.root) for s in sites]) as sim:
        sim.run_plan(bundle, out, timeout_s=600)
        procs = list(sim.procs.processes)
    assert all(not p.alive() for p in procs)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    assert set(metrics["rounds"][-1]["sites"]) == {"hospital0", "hospital1"}
    verify_log(out / "audit")
    for s in sites:  # each virtual node trained on its own site folder and audited it there
        assert verify_log(s.audit_dir).events.get("update.sent") == 2
