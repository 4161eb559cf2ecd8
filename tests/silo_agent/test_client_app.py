"""The ClientApp's refusals, called in-process with real Flower messages and a real site folder.

Each refusal is an error reply with a one-line reason, is audited at the silo, and carries no
local path (hospital paths can hold patient names).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from compliance import AuditLog
from fedsilo import protocol as P
from pipelines.networks import build_network
from pipelines.plan import parse_plan
from silo_agent.client_app import evaluate, train
from silo_agent.site import init_site, register_dataset

PLAN = {"name": "t", "task": "seg3d", "model": {"network": "UNet", "args": {"channels": [4, 8], "strides": [2]}},
        "data": {"dataset": "ct"}, "federation": {"rounds": 1, "min_silos": 1}}


def message(plan_yaml: str, plan_hash: str, arrays: ArrayRecord, kind: str = "train") -> Message:
    config = ConfigRecord({P.PLAN_YAML: plan_yaml, P.PLAN_HASH: plan_hash, P.RUN_ID: "run1", P.ROUND: 1})
    return Message(content=RecordDict({P.ARRAYS: arrays, P.CONFIG: config}), message_type=kind, dst_node_id=1)


def context(site_dir: Path | None) -> Context:
    node_config = {"site-dir": str(site_dir)} if site_dir else {}
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch):
    """Messages are created as a ServerApp would: Flower reads the sender's run and node from here."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


@pytest.fixture
def site(tmp_path):
    site = init_site(tmp_path / "DOE^JANE-site", "hospital0")  # a path carrying a patient-like name
    datalist = tmp_path / "DOE^JANE-data" / "datalist.json"
    datalist.parent.mkdir()
    datalist.write_text(json.dumps({"training": [{"image": "missing-case", "label": "missing.nii.gz"}], "test": []}))
    return register_dataset(site, "ct", task="seg3d", datalist=datalist)


def plan_and_arrays():
    import yaml

    plan = parse_plan(PLAN)
    text = yaml.safe_dump(PLAN)
    return plan, text, ArrayRecord(build_network(plan, seed=0).state_dict())


def audit_events(site) -> list[dict]:
    """What the silo agent recorded (site setup by hospital IT comes first in the log)."""
    with AuditLog.open(site.audit_dir, create=False) as log:
        return [r for r in log.records() if r["source"].startswith("silo-agent@")]


def test_altered_plan_is_refused_before_any_data_is_read(site):
    plan, text, arrays = plan_and_arrays()
    reply = train(message(text.replace("rounds: 1", "rounds: 9"), plan.hash(), arrays), context(site.root))
    assert reply.has_error() and reply.error.code == P.ERR_REFUSED
    assert "plan hash mismatch" in reply.error.reason
    events = audit_events(site)
    assert [e["event"] for e in events] == ["plan.refused"] and events[0]["outcome"] == "denied"


def test_data_errors_do_not_leave_the_site_with_their_paths(site):
    plan, text, arrays = plan_and_arrays()
    reply = train(message(text, plan.hash(), arrays), context(site.root))
    assert reply.has_error() and reply.error.code == P.ERR_BAD_INPUT
    assert "DOE^JANE" not in reply.error.reason and "cannot be used" in reply.error.reason
    assert all("DOE^JANE" not in json.dumps(e) for e in audit_events(site))
    assert "missing-case" in (site.logs_dir / "silo.log").read_text()  # the full reason stays local


def test_unknown_dataset_is_refused_naming_the_registered_ones(site):
    raw = dict(PLAN, data={"dataset": "mr"})
    import yaml

    plan = parse_plan(raw)
    reply = evaluate(message(yaml.safe_dump(raw), plan.hash(), ArrayRecord(build_network(plan, seed=0).state_dict()), "evaluate"),
                     context(site.root))
    assert reply.has_error() and "no dataset 'mr'" in reply.error.reason and "registered: ct" in reply.error.reason


def test_foreign_model_tensors_are_refused(site):
    plan, text, _ = plan_and_arrays()
    foreign = ArrayRecord({"evil": torch.zeros(3)})
    reply = train(message(text, plan.hash(), foreign), context(site.root))
    assert reply.has_error() and reply.error.code == P.ERR_REFUSED and "global model" in reply.error.reason


def test_a_node_without_a_site_folder_answers_with_the_fix(tmp_path):
    plan, text, arrays = plan_and_arrays()
    reply = train(message(text, plan.hash(), arrays), context(None))
    assert reply.has_error() and "site-dir" in reply.error.reason
