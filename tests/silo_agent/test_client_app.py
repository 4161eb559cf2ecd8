"""The ClientApp's refusals, called in-process with real Flower messages and a real site folder.

Each refusal is an error reply with a one-line reason, is audited at the silo, and carries no
local path (hospital paths can hold patient names). Plans are signed with a real researcher key
and approved (or not) with a real officer key, through silo_agent.approvals.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from compliance import AuditLog
from fedsilo import protocol as P
from fedsilo.wire import pack
from pipelines.networks import build_network
from pipelines.plan import parse_plan
from compliance.checkpoint import Signer
from fedsilo.errors import ConfigError
from compliance.statements import sign_statement, sign_submission
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from silo_agent import approvals
from silo_agent.approvals import add_officer, decide, store_plan, stored_plans, verify_submission
from silo_agent.client_app import evaluate, train
from silo_agent.site import init_site, register_dataset
from tiny_data import write_tiny_datalist

PLAN = {"name": "t", "task": "seg3d", "model": {"network": "UNet", "args": {"channels": [4, 8], "strides": [2]}},
        "data": {"dataset": "ct"}, "federation": {"rounds": 1, "min_silos": 2}}
RESEARCHER = Signer("a.jones", Ed25519PrivateKey.generate())


def submission(plan_text: str, plan_hash: str, signer: Signer = RESEARCHER) -> bytes:
    return sign_submission(plan_text, plan_hash, "t", signer, "2026-01-01T00:00:00.000000Z").note


def message(plan_yaml: str, plan_hash: str, arrays, kind: str = "train", *, signed: bool = True,
            signer: Signer = RESEARCHER) -> Message:
    config = ConfigRecord({P.PLAN_YAML: plan_yaml, P.PLAN_HASH: plan_hash, P.RUN_ID: "run1", P.ROUND: 1})
    if signed:
        config[P.SUBMISSION] = submission(plan_yaml, plan_hash, signer)
        config[P.RESEARCHER_KEY] = signer.vkey()
    return Message(content=RecordDict({P.ARRAYS: arrays, P.CONFIG: config}), message_type=kind, dst_node_id=1)


def approve(site, raw: dict = PLAN, decision: str = "approved", **kw):
    """Store the plan with a valid submission and record the officer's decision, as 'silo plan approve' does."""
    import yaml

    text = yaml.safe_dump(raw)
    plan = parse_plan(raw)
    store_plan(site, text, plan.hash(), verify_submission(text, plan.hash(), submission(text, plan.hash()), RESEARCHER.vkey()))
    decide(site, plan.hash(), officer="j.smith", decision=decision, **kw)


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
    datalist = write_tiny_datalist(tmp_path / "DOE^JANE-data", names=["missing-case", "case-1", "case-2"])
    add_officer(site, "j.smith")
    site = register_dataset(site, "ct", task="seg3d", datalist=datalist)
    (datalist.parent / "images" / "missing-case.nii.gz").unlink()  # gone after registration: reading it must fail
    return site


def plan_and_arrays():
    import yaml

    plan = parse_plan(PLAN)
    text = yaml.safe_dump(PLAN)
    return plan, text, pack(build_network(plan, seed=0).state_dict())


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
    approve(site)
    plan, text, arrays = plan_and_arrays()
    reply = train(message(text, plan.hash(), arrays), context(site.root))
    assert reply.has_error() and reply.error.code == P.ERR_BAD_INPUT
    assert "DOE^JANE" not in reply.error.reason and "cannot be used" in reply.error.reason
    assert all("DOE^JANE" not in json.dumps(e) for e in audit_events(site))
    assert "missing-case" in (site.logs_dir / "silo.log").read_text()  # the full reason stays local


def test_unknown_dataset_is_refused_naming_the_registered_ones(site):
    raw = dict(PLAN, data={"dataset": "mr"})
    import yaml

    approve(site, raw)
    plan = parse_plan(raw)
    reply = evaluate(message(yaml.safe_dump(raw), plan.hash(), pack(build_network(plan, seed=0).state_dict()), "evaluate"),
                     context(site.root))
    assert reply.has_error() and "no dataset 'mr'" in reply.error.reason and "registered: ct" in reply.error.reason


def test_foreign_model_tensors_are_refused(site):
    approve(site)
    plan, text, _ = plan_and_arrays()
    foreign = pack({"evil": torch.zeros(3)})
    reply = train(message(text, plan.hash(), foreign), context(site.root))
    assert reply.has_error() and reply.error.code == P.ERR_REFUSED and "global model" in reply.error.reason


def test_a_global_model_bigger_than_the_plans_network_is_refused_before_decoding(site):
    approve(site)
    plan, text, _ = plan_and_arrays()
    state = {k: v.numpy() for k, v in build_network(plan, seed=0).state_dict().items()}
    state["padding"] = np.zeros(2**21, np.float32)  # 8 MiB more than the network holds
    reply = train(message(text, plan.hash(), pack(state)), context(site.root))
    assert reply.has_error() and reply.error.code == P.ERR_REFUSED
    assert "global model: the packed tensors take" in reply.error.reason and "at most" in reply.error.reason


def test_a_node_without_a_site_folder_answers_with_the_fix(tmp_path):
    plan, text, arrays = plan_and_arrays()
    reply = train(message(text, plan.hash(), arrays), context(None))
    assert reply.has_error() and "site-dir" in reply.error.reason


# --- approval, policy and budget, all before any data is read ------------------------------------------------


def refused(site, kind: str = "train", raw: dict = PLAN, **message_kw) -> str:
    """Send the plan; assert a refusal (not a data error: the datalist's cases do not exist) and return its reason."""
    import yaml

    plan = parse_plan(raw)
    msg = message(yaml.safe_dump(raw), plan.hash(), pack(build_network(plan, seed=0).state_dict()), kind, **message_kw)
    reply = (train if kind == "train" else evaluate)(msg, context(site.root))
    assert reply.has_error() and reply.error.code == P.ERR_REFUSED, reply.error.reason
    assert audit_events(site)[-1]["event"] == "plan.refused" and audit_events(site)[-1]["outcome"] == "denied"
    return reply.error.reason


@pytest.mark.parametrize("kind", ["train", "evaluate"])
def test_an_unapproved_plan_is_refused_and_queued_for_review(site, kind):
    reason = refused(site, kind)
    assert f"plan {parse_plan(PLAN).hash()[:12]} is not approved at site hospital0" in reason
    [stored] = stored_plans(site)
    assert stored.status() == "pending" and stored.submission.researcher == "a.jones"


def test_an_unsigned_plan_is_refused(site):
    approve(site)
    assert "carries no researcher signature" in refused(site, signed=False)


def test_a_plan_signed_by_another_researcher_key_is_refused(site):
    approve(site)
    other = Signer("a.jones", Ed25519PrivateKey.generate())  # same name, another key
    assert "approved as submitted by a.jones, this request is signed by another key" in refused(site, signer=other)


def test_a_rejected_plan_is_refused_with_the_officers_reason(site):
    approve(site, decision="rejected", reason="use a robust rule")
    assert "was rejected by j.smith" in refused(site) and "use a robust rule" in refused(site)


def test_an_expired_approval_is_refused(site):
    from datetime import datetime, timedelta, timezone
    import time

    approve(site, expires=datetime.now(timezone.utc) + timedelta(seconds=1))
    time.sleep(1.2)
    assert "expired" in refused(site)


def test_an_approval_for_another_toolkit_version_is_refused(site, monkeypatch):
    approve(site)
    monkeypatch.setattr(approvals, "TOOLKIT", "fedsilo/9.9.9")
    assert "was approved for fedsilo/0.1.0, this silo runs fedsilo/9.9.9" in refused(site)


def test_a_forged_approval_is_refused(site):
    approve(site)
    plan_hash = parse_plan(PLAN).hash()
    forger = Signer("j.smith", Ed25519PrivateKey.generate())  # the officer's name, not the officer's key
    note = sign_statement("plan-approval", [("site", "hospital0"), ("plan", plan_hash), ("decision", "approved")], forger)
    (site.root / "plans" / f"{plan_hash}.decision").write_bytes(note)
    assert "the stored approval does not verify" in refused(site)


def test_a_policy_tightened_after_approval_is_enforced_and_recorded(site):
    approve(site)
    path = site.root / "policy.yaml"
    path.write_text(path.read_text().replace("allowed_metrics:\n- loss\n- dice", "allowed_metrics:\n- loss"))
    reason = refused(site)
    assert "now breaks the site policy" in reason and "metrics: dice may not leave this site" in reason
    changed = [e for e in audit_events(site) if e["event"] == "policy.changed"]
    assert len(changed) == 1 and changed[0]["actor"]["role"] == "silo-agent"


def test_approval_refuses_a_plan_that_breaks_the_policy(site):
    import yaml

    raw = {**PLAN, "privacy": {"target_epsilon": 50.0}}
    plan = parse_plan(raw)
    text = yaml.safe_dump(raw)
    store_plan(site, text, plan.hash(), verify_submission(text, plan.hash(), submission(text, plan.hash()), RESEARCHER.vkey()))
    with pytest.raises(ConfigError, match=r"breaks the site policy: privacy.target_epsilon: 50.0 exceeds the site's 8.0"):
        decide(site, plan.hash(), officer="j.smith", decision="approved")


def test_a_round_past_the_lifetime_budget_is_refused_before_training(site):
    approve(site)
    path = site.root / "policy.yaml"
    path.write_text(path.read_text().replace("lifetime_epsilon_per_dataset: 20.0", "lifetime_epsilon_per_dataset: 0.5"))
    reason = refused(site)
    assert "privacy budget: dataset 'ct' has spent epsilon 0.00 of its lifetime 0.5; this round would bring it to 8." in reason


def test_a_plan_text_edited_after_signing_is_refused(site):
    """Comments do not change the plan hash, but the researcher signed the exact text an officer reads."""
    import yaml

    approve(site)
    plan = parse_plan(PLAN)
    text = yaml.safe_dump(PLAN)
    msg = message(text, plan.hash(), pack(build_network(plan, seed=0).state_dict()))
    msg.content[P.CONFIG][P.PLAN_YAML] = "# cleared by the ethics board\n" + text  # same hash, other text
    reply = train(msg, context(site.root))
    assert reply.has_error() and "plan text differs from the text the researcher signed" in reply.error.reason


def test_a_secure_aggregation_plan_asked_for_in_the_clear_is_refused(site):
    """A coordinator that names secagg+ in the plan but asks for a plain update would see it: the silo refuses."""
    raw = {**PLAN, "federation": {"rounds": 1, "min_silos": 3, "secure_aggregation": "secagg+", "update_norm_bound": 5.0}}
    reason = refused(site, raw=raw)
    assert "requires secure aggregation (secagg+), but this request would send the update in the clear" in reason


@pytest.mark.parametrize("samples, shares, threshold, words", [
    (2, 2, 2, "each could read the other's update"),
    (5, 5, 2, "threshold 2 of 5 shares is not more than half"),
])
def test_a_secure_aggregation_setup_that_would_not_protect_the_update_is_refused(site, samples, shares, threshold, words):
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

    from silo_agent.secure_aggregation import secure_aggregation_mod

    setup = ConfigRecord({Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: samples, Key.SHARE_NUMBER: shares, Key.THRESHOLD: threshold,
                          Key.CLIPPING_RANGE: 1.0, Key.TARGET_RANGE: 2**20, Key.MOD_RANGE: 2**32, Key.MAX_WEIGHT: 100.0})
    msg = Message(content=RecordDict({RECORD_KEY_CONFIGS: setup}), message_type="train", dst_node_id=1)
    called = []
    reply = secure_aggregation_mod(msg, context(site.root), lambda m, c: called.append(m))
    assert reply.has_error() and reply.error.code == P.ERR_REFUSED and words in reply.error.reason
    assert not called
    # A sound setup goes on to Flower's key generation: the reply carries this silo's two public keys.
    setup[Key.SAMPLE_NUMBER], setup[Key.SHARE_NUMBER], setup[Key.THRESHOLD] = 3, 3, 2
    reply = secure_aggregation_mod(Message(content=RecordDict({RECORD_KEY_CONFIGS: setup}), message_type="train", dst_node_id=1),
                                   context(site.root), lambda m, c: called.append(m))
    assert not reply.has_error() and {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2} <= set(reply.content[RECORD_KEY_CONFIGS].keys())


# --- a train message that asks for the previous round's evaluation -------------------------------------------------


def _asking_evaluation(raw: dict, evaluated, round_: int = 2) -> Message:
    import yaml

    plan = parse_plan(raw)
    msg = message(yaml.safe_dump(raw), plan.hash(), pack(build_network(plan, seed=0).state_dict()))
    msg.content[P.CONFIG][P.ROUND] = round_
    msg.content[P.EVALUATE] = ConfigRecord({P.ROUND: evaluated})
    return msg


def test_a_train_message_asking_for_an_evaluation_answers_both_in_one_reply(tmp_path):
    """The silo evaluates the model it received (the previous round's) before training from it, and the one reply
    carries the update and that evaluation; the test split's use is audited under the evaluated round."""
    site = init_site(tmp_path / "site", "hospital0")
    add_officer(site, "j.smith")
    site = register_dataset(site, "ct", task="seg3d", datalist=write_tiny_datalist(tmp_path / "data", cases=3))
    raw = {**PLAN, "training": {"local_epochs": 1, "batch_size": 2}}
    approve(site, raw)
    reply = train(_asking_evaluation(raw, 1), context(site.root))
    assert not reply.has_error(), reply.error.reason
    assert set(reply.content.keys()) == {P.ARRAYS, P.METRICS, P.IDENTITY, P.EVALUATION}
    evaluation = dict(reply.content[P.EVALUATION])
    assert 0.0 <= evaluation["dice"] <= 1.0 and evaluation[P.NUM_EXAMPLES] == 1 and evaluation["seconds"] > 0
    assert evaluation["seconds"] <= reply.content[P.METRICS]["seconds"]  # the silo's whole work on the message includes it
    used = [(r["round"], r["details"]["split"]) for r in audit_events(site) if r["event"] == "dataset.used"]
    assert used == [(1, "test"), (2, "training")]


@pytest.mark.parametrize("evaluated", [2, 3, -1, "1"])
def test_a_train_message_asking_to_evaluate_a_round_not_before_it_is_refused(site, evaluated):
    approve(site)
    reply = train(_asking_evaluation(PLAN, evaluated), context(site.root))
    assert reply.has_error() and reply.error.code == P.ERR_REFUSED
    assert "only an earlier round's model can be" in reply.error.reason


def test_a_site_holding_a_checkpoint_the_coordinator_never_heard_back_about_cosigns_through_the_other_proof(tmp_path):
    """The site cosigned a checkpoint whose reply was lost (the ServerApp died); the resumed coordinator still thinks it
    holds nothing. The next request's extra proof, from the size the site holds, lets it cosign; without one it does
    not cosign (audited) but does not refuse: a proof from another size is no evidence of a fork. A proof that does not
    lead from what it holds is a refusal."""
    from compliance import EventType
    from fedsilo.errors import RefusalError
    from silo_agent.client_app import _witness

    coordinator = Signer(P.COORDINATOR_LOG_KEY, Ed25519PrivateKey.generate())
    site = init_site(tmp_path / "site", "hospital0")
    (site.root / "trust").mkdir(exist_ok=True)
    (site.root / "trust" / f"{P.COORDINATOR_LOG_KEY}.vkey").write_text(coordinator.vkey() + "\n", encoding="utf-8")
    actor = {"kind": "coordinator", "id": "c", "site": None, "role": "aggregator", "key": None}
    with AuditLog.open(tmp_path / "coordinator", origin="fedsilo.coordinator/run1", signer=coordinator, source="coordinator") as log, \
            AuditLog.open(site.audit_dir, source="silo-agent") as silo_log:
        for _ in range(3):
            log.append(EventType.ROUND_STARTED, actor=actor, run_id="run1", round=1)
        first = log.sign_checkpoint()
        held = len(log)
        _witness(ConfigRecord({P.CHECKPOINT: first, P.PROOF: [], P.OLD_SIZE: 0}), site, silo_log, site.actor(), "run1", 1)
        for _ in range(4):
            log.append(EventType.ROUND_STARTED, actor=actor, run_id="run1", round=2)
        second = log.sign_checkpoint()
        stale = {P.CHECKPOINT: second, P.PROOF: [], P.OLD_SIZE: 0}
        assert _witness(ConfigRecord(stale), site, silo_log, site.actor(), "run1", 2) is None
        [skipped] = [r for r in silo_log.records() if r["event"] == "checkpoint.cosigned" and r["outcome"] == "failure"]
        assert f"the witness holds size {held}" in skipped["reason"] and skipped["details"]["held_size"] == held
        forged = held.to_bytes(8, "big") + bytes(32)  # a "proof" from the held size that leads nowhere
        with pytest.raises(RefusalError, match="witness refused the coordinator's checkpoint"):
            _witness(ConfigRecord({**stale, P.OTHER_PROOFS: [forged]}), site, silo_log, site.actor(), "run1", 2)
        other = held.to_bytes(8, "big") + b"".join(bytes(h) for h in log.consistency_proof(held, len(log)))
        cosigned = _witness(ConfigRecord({**stale, P.OTHER_PROOFS: [other]}), site, silo_log, site.actor(), "run1", 2)
        assert cosigned.startswith(second)
        with pytest.raises(RefusalError, match="malformed consistency proof"):
            _witness(ConfigRecord({**stale, P.OTHER_PROOFS: [b"\x00" * 9]}), site, silo_log, site.actor(), "run1", 2)


def test_a_sealed_train_message_is_answered_sealed_with_the_same_records(tmp_path):
    """The coordinator seals a plain round's content into one envelope (fedsilo.envelope); the silo opens it, checks it
    as before, and seals its reply, which opens to the update, metrics and identity the egress guard checked."""
    from fedsilo.envelope import is_sealed, open_content, seal

    site = init_site(tmp_path / "site", "hospital0")
    add_officer(site, "j.smith")
    site = register_dataset(site, "ct", task="seg3d", datalist=write_tiny_datalist(tmp_path / "data", cases=3))
    raw = {**PLAN, "training": {"local_epochs": 1, "batch_size": 2}}
    approve(site, raw)
    msg = _asking_evaluation(raw, 1)
    msg.content = seal(msg.content)
    reply = train(msg, context(site.root))
    assert not reply.has_error(), reply.error.reason
    assert is_sealed(reply.content)
    opened = open_content(reply.content, P.RECORDS_FROM_SILO)
    assert set(opened.keys()) == {P.ARRAYS, P.METRICS, P.IDENTITY, P.EVALUATION}
    assert opened[P.IDENTITY][P.SITE] == "hospital0" and opened[P.METRICS][P.NUM_EXAMPLES] == 2


@pytest.mark.parametrize("blob, why", [
    (b"\xff\xff DOE^JANE", "the envelope does not decode as Flower records"),
    # 17 bytes: a 'config' record whose item "x" sets no value (Flower's decoder raised AttributeError on it)
    (bytes.fromhex("0a0f0a06636f6e66696722050a030a0178"), "record 'config' has an item with no value"),
])
def test_a_message_whose_envelope_cannot_be_opened_is_refused_and_audited(site, blob, why):
    approve(site)
    msg = Message(content=RecordDict({P.ENVELOPE: ConfigRecord({P.ENVELOPE: blob})}), message_type="train", dst_node_id=1)
    reply = train(msg, context(site.root))
    assert reply.has_error() and reply.error.code == P.ERR_REFUSED
    assert f"cannot be opened: {why}" in reply.error.reason
    assert "DOE" not in reply.error.reason
    refused = [r for r in audit_events(site) if r["event"] == "plan.refused"]
    assert len(refused) == 1 and "cannot be opened" in refused[0]["reason"]


# --- training.personalize: the last round's model stays at the site and is evaluated beside the global one ----------


def _personalizing_site(tmp_path, personalize: bool = True):
    import yaml

    site = init_site(tmp_path / "site", "hospital0")
    add_officer(site, "j.smith")
    site = register_dataset(site, "ct", task="seg3d", datalist=write_tiny_datalist(tmp_path / "data", cases=3))
    raw = {**PLAN, "training": {"local_epochs": 1, "batch_size": 2, "personalize": personalize}}
    approve(site, raw)
    plan = parse_plan(raw)
    return site, plan, yaml.safe_dump(raw)


def test_a_personalizing_plan_keeps_the_last_rounds_model_and_reports_it_beside_the_global_one(tmp_path):
    """Round 1 of 1 is the last: the model trained from the global one is kept in the site's models folder (global +
    the update sent, exactly), audited, and at the final evaluation its figures come back as personalized-*."""
    from fedsilo.wire import unpack_record
    from pipelines.serialization import load_model
    from silo_agent.client_app import personalized_model_path

    site, plan, text = _personalizing_site(tmp_path)
    initial = {k: v.numpy().copy() for k, v in build_network(plan, seed=0).state_dict().items()}
    reply = train(message(text, plan.hash(), pack(build_network(plan, seed=0).state_dict())), context(site.root))
    assert not reply.has_error(), reply.error.reason
    path = personalized_model_path(site, "run1")
    assert path.parent == site.root / "models"
    kept = load_model(path)
    delta = unpack_record(reply.content[P.ARRAYS])
    for name, value in initial.items():
        np.testing.assert_allclose(kept[name], value + delta[name], rtol=0, atol=1e-6)
    [saved] = [r for r in audit_events(site) if r["event"] == "state.saved"]
    assert saved["object"]["id"] == "personalized/run1" and "never sent" in saved["details"]["kind"]
    assert saved["details"]["lr_scale"] == 1.0  # round 1 of 1 trains from the initial weights: the plan's rate
    # The final evaluation (the global model after round 1): both models on the same test cases.
    final = evaluate(message(text, plan.hash(), pack(build_network(plan, seed=0).state_dict()), "evaluate"), context(site.root))
    assert not final.has_error(), final.error.reason
    metrics = dict(final.content[P.METRICS])
    assert 0.0 <= metrics["dice"] <= 1.0 and 0.0 <= metrics["personalized-dice"] <= 1.0
    assert metrics["personalized-loss"] != metrics["loss"]  # a different model: the kept one, not the global one
    [used] = [r for r in audit_events(site) if r["event"] == "dataset.used" and r["details"]["split"] == "test"]
    assert "personalized-dice" in used["details"]


def test_without_personalize_nothing_is_kept_and_no_personalized_figure_leaves(tmp_path):
    from silo_agent.client_app import personalized_model_path

    site, plan, text = _personalizing_site(tmp_path, personalize=False)
    assert not train(message(text, plan.hash(), pack(build_network(plan, seed=0).state_dict())), context(site.root)).has_error()
    assert not personalized_model_path(site, "run1").exists() and not (site.root / "models").exists()
    final = evaluate(message(text, plan.hash(), pack(build_network(plan, seed=0).state_dict()), "evaluate"), context(site.root))
    assert not any(k.startswith("personalized-") for k in dict(final.content[P.METRICS]))


def test_a_kept_model_that_is_not_the_plans_network_is_refused_in_one_line(tmp_path):
    from pipelines.serialization import save_model
    from silo_agent.client_app import personalized_model_path

    site, plan, text = _personalizing_site(tmp_path)
    save_model(personalized_model_path(site, "run1"), {"conv.weight": np.zeros((2, 2), dtype=np.float32)})
    final = evaluate(message(text, plan.hash(), pack(build_network(plan, seed=0).state_dict()), "evaluate"), context(site.root))
    assert final.has_error() and "personalized model personalized-" in final.error.reason and "is not the plan's network" in final.error.reason
    assert "\n" not in final.error.reason and str(tmp_path) not in final.error.reason


def _small_site(tmp_path):
    """A site with 2 training cases that allows training without DP (so that updates can be compared exactly)."""
    import yaml

    site = init_site(tmp_path / "site", "hospital0")
    policy = yaml.safe_load((site.root / "policy.yaml").read_text(encoding="utf-8"))
    (site.root / "policy.yaml").write_text(yaml.safe_dump({**policy, "require_dp": False}), encoding="utf-8")
    add_officer(site, "j.smith")
    return register_dataset(site, "ct", task="seg3d", datalist=write_tiny_datalist(tmp_path / "data", cases=3))


def _train_small(site, *, rounds: int, round_: int, personalize: bool, optimizer: str = "sgd") -> dict:
    """One round's update of a batch-8 plan at the small site, from the seed-0 model, without DP."""
    import yaml

    from fedsilo.wire import unpack_record

    raw = {**PLAN, "federation": {"rounds": rounds, "min_silos": 2}, "privacy": {"enabled": False},
           "training": {"local_epochs": 1, "batch_size": 8, "personalize": personalize,
                        "optimizer": {"name": optimizer, "lr": 0.1, **({"momentum": 0.0} if optimizer == "sgd" else {})}}}
    approve(site, raw)
    plan = parse_plan(raw)
    msg = message(yaml.safe_dump(raw), plan.hash(), pack(build_network(parse_plan(PLAN), seed=0).state_dict()))
    msg.content[P.CONFIG][P.ROUND] = round_
    reply = train(msg, context(site.root))
    assert not reply.has_error(), reply.error.reason
    return unpack_record(reply.content[P.ARRAYS])


def _assert_scaled(update: dict, reference: dict, factor: float) -> None:
    assert sum(float(np.abs(v).sum()) for v in reference.values()) > 0
    for name, value in reference.items():
        np.testing.assert_allclose(update[name], factor * value, rtol=1e-3, atol=1e-7)


def test_a_small_site_fine_tunes_its_personalized_model_at_the_linearly_scaled_rate(tmp_path):
    """Round 2 of 2 of a personalizing plan fine-tunes a trained global model: a site with 2 training cases and a
    batch of 8 takes one step of the whole data at the plan's rate x 2/8 (the linear scaling rule), so its update
    (and its kept model) is a quarter of what the same round trains without personalize. Without DP (the site
    allows it here) and with one SGD step, the two updates differ by that factor alone."""
    from pipelines.serialization import load_model
    from silo_agent.client_app import personalized_model_path

    site = _small_site(tmp_path)
    initial = {k: v.numpy().copy() for k, v in build_network(parse_plan(PLAN), seed=0).state_dict().items()}
    plain = _train_small(site, rounds=2, round_=2, personalize=False)
    assert not personalized_model_path(site, "run1").exists()
    scaled = _train_small(site, rounds=2, round_=2, personalize=True)
    _assert_scaled(scaled, plain, 0.25)
    kept = load_model(personalized_model_path(site, "run1"))
    for name, value in initial.items():
        np.testing.assert_allclose(kept[name], value + scaled[name], rtol=0, atol=1e-6)
    [saved] = [r for r in audit_events(site) if r["event"] == "state.saved"]
    assert saved["details"]["lr_scale"] == 0.25 and saved["round"] == 2
    assert "fine-tuned at 0.25 x the plan's learning rate" in (site.root / "logs" / "silo.log").read_text(encoding="utf-8")


@pytest.mark.parametrize("rounds, round_, optimizer, why", [
    (2, 1, "sgd", "not the last round: federated training at the plan's rate"),
    (1, 1, "sgd", "the only round trains from the initial weights, which wants the full rate"),
    (2, 2, "adam", "Adam's step does not grow with the weight per case: the rule is SGD's"),
])
def test_the_rate_is_the_plans_outside_sgd_fine_tuning(tmp_path, rounds, round_, optimizer, why):
    site = _small_site(tmp_path)
    plain = _train_small(site, rounds=rounds, round_=round_, personalize=False, optimizer=optimizer)
    personalizing = _train_small(site, rounds=rounds, round_=round_, personalize=True, optimizer=optimizer)
    if optimizer == "sgd":
        _assert_scaled(personalizing, plain, 1.0)
    else:  # Adam's first step is about lr x sign(gradient): float noise flips tiny gradients, so compare sizes (x 0.25 if scaled)
        size = lambda update: sum(float(np.abs(v).sum()) for v in update.values())  # noqa: E731
        assert 0.9 < size(personalizing) / size(plain) < 1.1
    saved = [r for r in audit_events(site) if r["event"] == "state.saved"]
    assert [r["details"]["lr_scale"] for r in saved] == ([1.0] if round_ == rounds else []), why
