"""A round retried after a coordinator crash is answered from the outbox: same update, no second privacy spend."""

from __future__ import annotations

import pytest
import yaml

from compliance import AuditLog
from fedsilo.wire import blob_of, pack, unpack_record
from pipelines.networks import build_network
from pipelines.plan import parse_plan
from silo_agent.approvals import add_officer
from silo_agent.client_app import train
from silo_agent.ledger import PrivacyLedger
from silo_agent.site import init_site, register_dataset
from test_client_app import PLAN, approve, context, message, serverapp_identity  # noqa: F401 - fixture
from tiny_data import write_tiny_datalist


@pytest.fixture
def site(tmp_path):
    site = init_site(tmp_path / "site", "hospital0")
    add_officer(site, "j.smith")
    return register_dataset(site, "ct", task="seg3d", datalist=write_tiny_datalist(tmp_path / "data", cases=6))


def _events(site, event: str) -> list[dict]:
    with AuditLog.open(site.audit_dir, create=False) as log:
        return [r for r in log.records() if r["event"] == event]


def test_a_retried_round_gets_the_same_update_without_a_new_spend(site):
    approve(site)
    plan = parse_plan(PLAN)
    text = yaml.safe_dump(PLAN)
    arrays = pack(build_network(plan, seed=0).state_dict())
    first = train(message(text, plan.hash(), arrays), context(site.root))
    assert not first.has_error(), first.error.reason if first.has_error() else ""
    with PrivacyLedger.for_site(site.privacy_dir) as ledger:
        spends = ledger.spends("ct")
    assert len(spends) == 1

    again = train(message(text, plan.hash(), arrays), context(site.root))  # the resumed coordinator asks again
    assert not again.has_error(), again.error.reason if again.has_error() else ""
    assert blob_of(first.content["arrays"]) == blob_of(again.content["arrays"])  # byte for byte the update already sent
    assert dict(first.content["metrics"]) == dict(again.content["metrics"])
    with PrivacyLedger.for_site(site.privacy_dir) as ledger:
        assert len(ledger.spends("ct")) == 1  # nothing counted twice
    resent = _events(site, "update.resent")
    assert len(resent) == 1 and resent[0]["round"] == 1
    assert len(_events(site, "dp.spent")) == 1


def test_the_same_round_with_another_global_model_is_still_refused(site):
    approve(site)
    plan = parse_plan(PLAN)
    text = yaml.safe_dump(PLAN)
    assert not train(message(text, plan.hash(), pack(build_network(plan, seed=0).state_dict())), context(site.root)).has_error()
    other = pack(build_network(plan, seed=1).state_dict())
    reply = train(message(text, plan.hash(), other), context(site.root))
    assert reply.has_error() and "already trained on dataset 'ct' (replayed message)" in reply.error.reason


@pytest.mark.parametrize("compression", ["int8", "topk"])
def test_a_compressed_update_is_what_the_coordinator_decodes_and_a_retry_resends_it(site, compression):
    from coordinator.validation import Expectation, validate_reply
    from pipelines.serialization import to_numpy
    from silo_agent.outbox import load_residual

    raw = {**PLAN, "federation": {**PLAN["federation"], "compression": compression}}
    approve(site, raw)
    plan = parse_plan(raw)
    text = yaml.safe_dump(raw)
    reference = to_numpy(build_network(plan, seed=0).state_dict())
    arrays = pack(build_network(plan, seed=0).state_dict())
    first = train(message(text, plan.hash(), arrays), context(site.root))
    assert not first.has_error(), first.error.reason if first.has_error() else ""
    names = set(unpack_record(first.content["arrays"]))
    suffix = {"int8": "/q", "topk": "/idx"}[compression]
    assert names and all(any(n.endswith(s) for s in (suffix, "/scale", "/offset", "/val")) for n in names)
    [sent] = _events(site, "update.sent")
    assert sent["details"]["compression"] == compression
    assert sent["details"]["bytes"] < sent["details"]["dense_bytes"] * (0.3 if compression == "int8" else 0.05)
    update = validate_reply(1, first.content, reference, Expectation(run_id="run1", round=1, compression=compression))
    assert set(update.delta) == set(reference) and update.wire_sha256 == sent["object"]["sha256"]
    assert update.wire_bytes == sent["details"]["bytes"]
    assert (load_residual(site.root, "run1", 2) is not None) == (compression == "topk")  # error feedback stays at the site
    assert load_residual(site.root, "run1", 1) is None  # round 1 starts from none, also when trained again

    again = train(message(text, plan.hash(), arrays), context(site.root))  # a retried round: the same payload, no new spend
    assert not again.has_error()
    assert blob_of(first.content["arrays"]) == blob_of(again.content["arrays"])  # byte for byte the update already sent
    assert len(_events(site, "dp.spent")) == 1
