"""The round driver over an in-process loopback grid: bad updates are rejected, audited, survived.

The grid here stands in for the SuperLink only (it hands the driver's real Flower messages to a
function that plays the silos and returns real reply messages); validation, aggregation, the server
optimizer and the audit log are the real ones. tests/e2e runs the same driver through a real
SuperLink and SuperNodes with TLS.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import numpy as np
import pytest
import yaml
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from compliance import AuditLog, verify_log
from coordinator.federation import FederatedRun
from fedsilo import protocol as P
from fedsilo.envelope import is_sealed, open_content, seal
from fedsilo.wire import pack
from fedsilo.errors import ConfigError, FedsiloError
from pipelines.plan import parse_plan

SILO_ERRORS = (P.ERR_REFUSED, P.ERR_BAD_INPUT, P.ERR_INTERNAL)
INITIAL = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}
GOOD = {"w": np.full((4, 3), 0.1, np.float32), "b": np.full(3, -0.1, np.float32)}


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch):
    """Messages are created as a ServerApp would: Flower reads the sender's run and node from here."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class LoopbackGrid:
    """Answers each message with ``silo(node, message)``; evaluate messages, and train messages that ask for an
    evaluation, get plain metrics.

    Implements the Grid calls the driver uses (push_messages, pull_messages) as Flower does: a pushed
    message gets an id, a reply names it. A silo function returning None never answers; one returning
    an ``Error`` with one of fedsilo's codes (a refusal) answers with it from the node, any other ``Error``
    is the reply the SuperLink itself sends for a node that stopped beating (its source is the SuperLink,
    not the node).
    """

    SUPERLINK = 1

    def __init__(self, nodes: list[int], silo: Callable[[int, Message], RecordDict]) -> None:
        self.nodes, self.silo = nodes, silo
        self.replies: dict[str, Message] = {}
        self.pushed = 0
        self.sealed: list[bool] = []  # per message pushed: whether it came sealed (fedsilo.envelope)
        self.seal_reply = seal

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            self.pushed += 1
            msg.metadata.__dict__["_message_id"] = f"m{self.pushed}"
            ids.append(msg.metadata.message_id)
            node = msg.metadata.dst_node_id
            sealed = is_sealed(msg.content)  # opened and answered sealed, as a silo does
            self.sealed.append(sealed)
            msg.content = open_content(msg.content, P.RECORDS_TO_SILO)
            if msg.metadata.message_type == "train":
                content = self.silo(node, msg)
                if isinstance(content, RecordDict) and P.EVALUATE in msg.content:  # the previous round's model, evaluated first
                    content[P.EVALUATION] = MetricRecord({"dice": 0.5, P.NUM_EXAMPLES: 4})
            else:
                content = RecordDict({P.METRICS: MetricRecord(self.evaluation(node)),
                                      P.IDENTITY: ConfigRecord({P.SITE: f"hospital{node}"})})
            if content is None:
                continue
            if sealed and isinstance(content, RecordDict):
                content = self.seal_reply(content)
            reply = Message(content, reply_to=msg)  # its src_node_id is the node the message went to
            if isinstance(content, Error) and content.code not in SILO_ERRORS:
                reply.metadata.__dict__["_src_node_id"] = self.SUPERLINK
            self.replies[msg.metadata.message_id] = reply
        return ids

    def evaluation(self, node: int) -> dict:
        """The metrics an evaluate message gets from ``node``."""
        return {"dice": 0.5, P.NUM_EXAMPLES: 4}

    def pull_messages(self, message_ids):
        # Like the SuperLink, in no promised order: the driver must not depend on it.
        return [self.replies.pop(i) for i in sorted(message_ids, reverse=True) if i in self.replies]


def honest(node: int, msg: Message, delta=None, run_id=None, round_=None) -> RecordDict:
    cfg = msg.content[P.CONFIG]
    delta = GOOD if delta is None else delta
    return RecordDict({
        P.ARRAYS: pack(delta),
        P.METRICS: MetricRecord({P.NUM_EXAMPLES: 10, "epsilon": 1.0}),
        P.IDENTITY: ConfigRecord({P.SITE: f"hospital{node}", P.RUN_ID: cfg[P.RUN_ID] if run_id is None else run_id,
                                  P.ROUND: int(cfg[P.ROUND]) if round_ is None else round_}),
    })


def plan_text(**federation) -> str:
    raw = {"name": "t", "task": "seg2d", "model": {"network": "UNet", "args": {"channels": [4, 8], "strides": [2]}},
           "privacy": {"enabled": False}, "federation": {"rounds": 1, "min_silos": 2, **federation}}
    return yaml.safe_dump(raw)


def run(tmp_path, silo, nodes=(1, 2, 3, 4, 5, 6, 7, 8), *, grid=None, node_keys=None, signer=None, witness_keys=(),
        **federation) -> tuple[FederatedRun, list[dict]]:
    text = plan_text(**federation)
    driver = FederatedRun(grid or LoopbackGrid(list(nodes), silo), parse_plan(yaml.safe_load(text)), text, tmp_path / "run", "run-1",
                          {k: v.copy() for k, v in INITIAL.items()}, node_keys=node_keys, signer=signer, witness_keys=witness_keys)
    try:
        driver.execute()
    finally:
        driver.audit.close()
    verify_log(tmp_path / "run" / "audit")
    with AuditLog.open(tmp_path / "run" / "audit", read_only=True) as log:
        return driver, list(log.records())


BAD = {
    1: ("non-finite", lambda n, m: honest(n, m, {**GOOD, "w": np.full((4, 3), np.nan, np.float32)})),
    2: ("non-finite", lambda n, m: honest(n, m, {**GOOD, "b": np.array([np.inf, 0, 0], np.float32)})),
    3: ("wrong-shape", lambda n, m: honest(n, m, {**GOOD, "w": np.zeros((3, 4), np.float32)})),
    4: ("wrong-dtype", lambda n, m: honest(n, m, {**GOOD, "w": GOOD["w"].astype(np.float64)})),
    5: ("norm-too-large", lambda n, m: honest(n, m, {k: v * 1e6 for k, v in GOOD.items()})),
    6: ("wrong-round", lambda n, m: honest(n, m, round_=0)),  # a reply replayed from another round
}


def test_each_bad_update_is_rejected_audited_and_the_round_goes_on(tmp_path):
    def silo(node, msg):
        return BAD[node][1](node, msg) if node in BAD else honest(node, msg)

    driver, records = run(tmp_path, silo, update_norm_bound=10.0)
    rejected = {int(r["object"]["id"]): r for r in records if r["event"] == "update.rejected"}
    assert {node: r["reason"] for node, r in rejected.items()} == {node: code for node, (code, _) in BAD.items()}
    assert all(r["outcome"] == "denied" and r["round"] == 1 for r in rejected.values())
    aggregate = next(r for r in records if r["event"] == "aggregate.computed")
    assert aggregate["details"]["input_sites"] == ["hospital7", "hospital8"]
    # Only the two honest updates moved the model (FedAvg of two equal deltas, server lr 1).
    for name in INITIAL:
        np.testing.assert_allclose(driver.global_state[name], GOOD[name], rtol=1e-6)


def test_plain_rounds_travel_sealed_both_ways_and_an_unopenable_reply_is_rejected_and_audited(tmp_path):
    """Every train message of a plain round leaves as one envelope (fedsilo.envelope); the silos' sealed replies are
    opened and validated as before; a reply whose envelope cannot be opened is audited as a rejected update, with the
    reason, and the round goes on with the others."""
    text = plan_text()
    grid = LoopbackGrid([1, 2, 3], honest)
    # A record the uplink accepts ('identity') whose item "x" sets no value: Flower's decoder raised AttributeError on it.
    crafted = bytes.fromhex("0a110a086964656e7469747922050a030a0178")
    grid.seal_reply = lambda content: (RecordDict({P.ENVELOPE: ConfigRecord({P.ENVELOPE: crafted})})
                                       if content[P.IDENTITY][P.SITE] == "hospital3" else seal(content))
    driver = FederatedRun(grid, parse_plan(yaml.safe_load(text)), text, tmp_path / "run", "run-1", {k: v.copy() for k, v in INITIAL.items()})
    try:
        driver.execute()
    finally:
        driver.audit.close()
    assert grid.sealed and all(grid.sealed)  # the train messages and the last round's evaluate messages
    with AuditLog.open(tmp_path / "run" / "audit", read_only=True) as log:
        records = list(log.records())
    received = sorted(r["details"]["site"] for r in records if r["event"] == "update.received")
    assert received == ["hospital1", "hospital2"]
    rejected = [r for r in records if r["event"] == "update.rejected"]
    assert len(rejected) == 1 and rejected[0]["object"]["id"] == "3"
    assert rejected[0]["reason"] == "reply envelope: record 'identity' has an item with no value"
    assert driver.state.rounds[0]["replied"] == 2


def test_secure_aggregation_stages_never_open_a_sealed_reply(tmp_path):
    """SecAgg+ messages are never sealed, so a sealed reply to one stays sealed (and is refused as malformed by the
    secure round's own checks): _send_and_receive opens replies only when asked to."""
    text = plan_text()
    grid = LoopbackGrid([1], honest)
    driver = _driver(tmp_path, grid, text)
    try:
        sealed_reply = driver._send_and_receive(driver._messages([1], 1, "train"), 5, unseal=False)
        opened_reply = driver._send_and_receive(driver._messages([1], 1, "train"), 5)
    finally:
        driver.audit.close()
    assert is_sealed(sealed_reply[0].content)
    assert not is_sealed(opened_reply[0].content) and P.ARRAYS in opened_reply[0].content


def test_clipping_instead_of_rejecting(tmp_path):
    big = {k: v * 1000 for k, v in GOOD.items()}
    driver, records = run(tmp_path, lambda n, m: honest(n, m, big), nodes=(1, 2), update_norm_bound=1.0, update_norm_action="clip")
    received = [r for r in records if r["event"] == "update.received"]
    assert len(received) == 2 and all(r["details"]["clipped"] for r in received)
    assert received[0]["details"]["l2_norm"] == pytest.approx(1000 * np.sqrt(12 * 0.01 + 3 * 0.01), rel=1e-5)
    norm = np.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in driver.global_state.values()))
    assert norm == pytest.approx(1.0, rel=1e-5)


def test_too_few_valid_updates_end_the_run_with_a_clear_error(tmp_path):
    def silo(node, msg):
        return BAD[1][1](node, msg) if node != 2 else honest(node, msg)

    with pytest.raises(FedsiloError, match=r"round 1: 1 valid update\(s\) of 3 silo\(s\), the plan needs 2"):
        run(tmp_path, silo, nodes=(1, 2, 3))
    with AuditLog.open(tmp_path / "run" / "audit", read_only=True) as log:
        events = [r["event"] for r in log.records()]
    assert events.count("update.rejected") == 2 and events[-1] == "run.failed"


def test_a_robust_rule_needs_enough_silos_before_the_run_starts(tmp_path):
    with pytest.raises(ConfigError, match=r"krum with these args needs at least 7 updates per round, min_silos is 3"):
        run(tmp_path, honest, min_silos=3, aggregation={"rule": "krum", "args": {"f": 2}})


def test_krum_selection_is_audited_by_site_and_the_outlier_left_out(tmp_path):
    def silo(node, msg):
        if node == 1:
            return honest(node, msg, {k: -50 * v for k, v in GOOD.items()})  # a sign-flipped, scaled update
        noise = np.random.default_rng(node).normal(0, 0.01, size=1)[0]
        return honest(node, msg, {k: v + np.float32(noise) for k, v in GOOD.items()})

    driver, records = run(tmp_path, silo, nodes=(1, 2, 3, 4, 5), min_silos=5, aggregation={"rule": "krum", "args": {"f": 1}},
                          update_norm_bound=1e6)
    details = next(r for r in records if r["event"] == "aggregate.computed")["details"]
    assert details["rule"] == "krum" and details["rule_args"] == {"f": 1}
    assert len(details["rule_details"]["selected_sites"]) == 1 and "hospital1" not in details["rule_details"]["selected_sites"]
    assert float(driver.global_state["w"][0, 0]) == pytest.approx(0.1, abs=0.05)


def test_silent_and_unavailable_silos_are_audited_by_node_and_the_round_goes_on(tmp_path, monkeypatch):
    """One silo never answers (the round waits out its timeout); the SuperLink answers for another that
    stopped beating. Both are recorded against the node they were sent to, and neither is asked to evaluate."""
    from fedsilo import flower_tuning

    monkeypatch.setenv(flower_tuning.ENV, "0.05")  # poll fast: the timeout below is the only wait

    def silo(node: int, msg: Message):
        if node == 3:
            return None
        if node == 4:
            return Error(code=5, reason="Node Unavailable: no heartbeat")
        return honest(node, msg)

    started = time.monotonic()
    driver, records = run(tmp_path, silo, nodes=(1, 2, 3, 4), rounds=2, min_silos=2, round_timeout_s=1)
    assert time.monotonic() - started >= 2  # one timeout per round
    missing = [r for r in records if r["event"] == "update.missing"]
    assert [(r["round"], r["object"]["id"]) for r in missing] == [(1, "3"), (2, "3")]
    rejected = [r for r in records if r["event"] == "update.rejected"]
    assert [(r["round"], r["object"]["id"]) for r in rejected] == [(1, "4"), (2, "4")]  # the node, not the SuperLink
    finished = [r for r in records if r["event"] == "round.finished"]
    assert [r["details"]["valid_updates"] for r in finished] == [2, 2]
    assert [sorted(r["sites"]) for r in driver.state.rounds] == [["hospital1", "hospital2"]] * 2  # only they evaluated


class RecordingGrid(LoopbackGrid):
    """A LoopbackGrid that keeps, per push, the (type, round, node) of every message, and can fail one push the way
    a crashed ServerApp would (an exception that is not the driver's own)."""

    def __init__(self, nodes, silo, crash_at_push: int | None = None) -> None:
        super().__init__(nodes, silo)
        self.pushes: list[list[tuple[str, int, int]]] = []
        self.evaluated_models: dict[int, dict[str, np.ndarray]] = {}
        self.crash_at_push = crash_at_push

    def push_messages(self, messages):
        if self.crash_at_push == len(self.pushes) + 1:
            raise RuntimeError("the ServerApp died")
        from fedsilo.wire import unpack_record

        opened = [(m, open_content(m.content, P.RECORDS_TO_SILO)) for m in messages]  # as a silo reads them
        self.pushes.append([(m.metadata.message_type, int(c[P.CONFIG][P.ROUND]), m.metadata.dst_node_id,
                             int(c[P.EVALUATE][P.ROUND]) if P.EVALUATE in c else None) for m, c in opened])
        for m, c in opened:
            if m.metadata.message_type == "evaluate" or P.EVALUATE in c:
                evaluated = int(c[P.EVALUATE][P.ROUND]) if P.EVALUATE in c else int(c[P.CONFIG][P.ROUND])
                self.evaluated_models[evaluated] = unpack_record(c[P.ARRAYS])
        return super().push_messages(messages)


def _driver(tmp_path, grid, text, resume=None) -> FederatedRun:
    return FederatedRun(grid, parse_plan(yaml.safe_load(text)), text, tmp_path / "run", "run-1", {k: v.copy() for k, v in INITIAL.items()},
                        resume=resume)


def _published(tmp_path, event: str | None = None) -> list:
    """The run's progress lines of one kind (their rounds), or its complete round rows (coordinator.progress)."""
    from coordinator.progress import ROUNDS_FILE, CompletedRounds, read_rows

    lines = read_rows(tmp_path / "run" / "logs" / ROUNDS_FILE)
    if event is not None:
        return [r["round"] for r in lines if r.get("event") == event]
    completed = CompletedRounds()
    return [row for line in lines for row in completed.add(line)]


def test_each_rounds_model_is_evaluated_in_the_next_rounds_train_messages(tmp_path):
    """One exchange per round: round r+1's train messages ask for round r's evaluation, the last round gets an evaluate
    message of its own; each evaluation gets round r's model, and a round's row is published once its evaluation is in."""
    grid = RecordingGrid([1, 2], honest)
    text = plan_text(rounds=3)
    driver = _driver(tmp_path, grid, text)
    models = []
    original = driver._checkpoint
    driver._checkpoint = lambda row: (models.append({k: v.copy() for k, v in driver.global_state.items()}), original(row))
    try:
        driver.execute()
    finally:
        driver.audit.close()
    assert [sorted(push) for push in grid.pushes] == [
        [("train", 1, 1, None), ("train", 1, 2, None)],
        [("train", 2, 1, 1), ("train", 2, 2, 1)],
        [("train", 3, 1, 2), ("train", 3, 2, 2)],
        [("evaluate", 3, 1, None), ("evaluate", 3, 2, None)],
    ]
    for r, model in enumerate(models, 1):  # round r's model, not the one before or after it
        for name in INITIAL:
            np.testing.assert_array_equal(grid.evaluated_models[r][name], model[name])
    assert _published(tmp_path, "round") == [1, 2, 3] and _published(tmp_path, "evaluated") == [1, 2, 3]
    rows = _published(tmp_path)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(s["dice"] == 0.5 for r in rows for s in r["sites"].values())
    assert rows[-1]["final_evaluation_seconds"] >= 0 and all(r["evaluation"] == "with the next round's training" for r in rows)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert all(s["dice"] == 0.5 for r in metrics["rounds"] for s in r["sites"].values())


def test_a_resumed_run_evaluates_the_round_whose_evaluation_was_lost(tmp_path):
    """The ServerApp dies as round 3's train messages (asking round 2's evaluation) leave: the resumed run asks round
    2's evaluation in round 3's train messages again, and every round's row is published exactly once."""
    from coordinator.run_state import load_snapshot

    text = plan_text(rounds=3)
    crashed = _driver(tmp_path, RecordingGrid([1, 2], honest, crash_at_push=3), text)
    with pytest.raises(RuntimeError, match="died"):
        crashed.execute()
    crashed.audit.close()
    assert _published(tmp_path, "round") == [1, 2] and _published(tmp_path, "evaluated") == [1]
    grid = RecordingGrid([1, 2], honest)
    resumed = _driver(tmp_path, grid, text, resume=load_snapshot(tmp_path / "run"))
    try:
        resumed.execute()
    finally:
        resumed.audit.close()
    assert [sorted(push) for push in grid.pushes] == [
        [("train", 3, 1, 2), ("train", 3, 2, 2)],
        [("evaluate", 3, 1, None), ("evaluate", 3, 2, None)],
    ]
    assert _published(tmp_path, "round") == [1, 2, 3] and _published(tmp_path, "evaluated") == [1, 2, 3]  # each once
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    assert all(s["dice"] == 0.5 for r in metrics["rounds"] for s in r["sites"].values())  # round 1's from its published row
    verify_log(tmp_path / "run" / "audit")


def test_a_silo_that_refuses_the_next_rounds_training_is_asked_for_its_evaluation_on_its_own(tmp_path):
    """hospital2 refuses round 2's training (say its privacy budget is spent): its evaluation of round 1's model comes
    from an evaluate message of its own, the round goes on with the others."""
    def silo(node, msg):
        if node == 3 and int(msg.content[P.CONFIG][P.ROUND]) == 2:
            return Error(code=P.ERR_REFUSED, reason="privacy budget spent")
        return honest(node, msg)

    grid = RecordingGrid([1, 2, 3], silo)
    text = plan_text(rounds=2)
    driver = _driver(tmp_path, grid, text)
    try:
        driver.execute()
    finally:
        driver.audit.close()
    assert [sorted(push) for push in grid.pushes] == [
        [("train", 1, 1, None), ("train", 1, 2, None), ("train", 1, 3, None)],
        [("train", 2, 1, 1), ("train", 2, 2, 1), ("train", 2, 3, 1)],
        [("evaluate", 1, 3, None)],  # only the silo whose train reply carried no evaluation
        [("evaluate", 2, 1, None), ("evaluate", 2, 2, None)],  # round 2's model, at the silos that trained in it
    ]
    rows = _published(tmp_path)
    assert sorted(rows[0]["sites"]) == ["hospital1", "hospital2", "hospital3"]
    assert all(s["dice"] == 0.5 for s in rows[0]["sites"].values())


def test_evaluation_figures_are_filed_under_the_nodes_known_site_and_only_finite_ones(tmp_path):
    """A reply cannot file figures under another site's name, and NaN or Inf never reach metrics.json."""
    grid = RecordingGrid([1, 2], honest)
    grid.seal_reply = lambda content: content  # replies edited below, after the silo answered: left unsealed
    original = grid.push_messages

    def push(messages):
        ids = original(messages)
        for mid in ids:
            reply = grid.replies.get(mid)
            if reply is not None and P.EVALUATION in reply.content and reply.metadata.src_node_id == 1:
                reply.content[P.EVALUATION] = MetricRecord({"dice": float("nan"), "loss": float("inf"), P.NUM_EXAMPLES: 4})
            if reply is not None and P.EVALUATION in reply.content and reply.metadata.src_node_id == 2:
                reply.content[P.IDENTITY] = ConfigRecord({P.SITE: "hospital1"})  # claims to be the other silo
        return ids

    grid.push_messages = push
    text = plan_text(rounds=2, min_silos=1)  # node 2's update, claiming another site, is rejected too
    driver = _driver(tmp_path, grid, text)
    try:
        driver.execute()
    finally:
        driver.audit.close()
    first = _published(tmp_path)[0]["sites"]
    assert "dice" not in first["hospital1"] and "test_loss" not in first["hospital1"]
    assert "dice" not in first["hospital2"]  # its claim to be hospital1 was not filed anywhere
    metrics = (tmp_path / "run" / "metrics.json").read_text()
    assert "NaN" not in metrics and "Infinity" not in metrics


class PushOrderGrid(LoopbackGrid):
    """A loopback grid that notes the destination nodes of each push."""

    def __init__(self, nodes, silo) -> None:
        super().__init__(nodes, silo)
        self.pushes: list[list[int]] = []

    def push_messages(self, messages):
        messages = list(messages)
        self.pushes.append([m.metadata.dst_node_id for m in messages])
        return super().push_messages(messages)


def test_the_slowest_silos_message_goes_out_first_and_the_aggregation_order_stays(tmp_path):
    """From the second round the silo that reported the longest work gets its message in a push of its own, ahead of
    the rest (coordinator.federation FederatedRun._push); replies, and so the aggregation's inputs, stay in node order.
    A silo that reports no figure is never put first."""
    work = {1: 2.0, 2: 9.0, 3: 5.0}  # the "seconds" each silo reports; silo 4 reports none

    def silo(node, msg):
        content = honest(node, msg, {k: v * node for k, v in GOOD.items()})
        if node in work:
            content[P.METRICS]["seconds"] = work[node]
        return content

    text = plan_text(rounds=3, update_norm_bound=10.0)
    grid = PushOrderGrid([1, 2, 3, 4], silo)
    driver = FederatedRun(grid, parse_plan(yaml.safe_load(text)), text, tmp_path / "run", "run-1", {k: v.copy() for k, v in INITIAL.items()})
    try:
        driver.execute()
    finally:
        driver.audit.close()
    assert grid.pushes[0] == [1, 2, 3, 4]  # nothing known yet: one push
    assert grid.pushes[1:] == [[2], [1, 3, 4]] * 3  # rounds 2 and 3, and the last round's evaluation
    assert driver.node_seconds == {1: 2.0, 2: 9.0, 3: 5.0}
    with AuditLog.open(tmp_path / "run" / "audit", read_only=True) as log:
        aggregates = [r for r in log.records() if r["event"] == "aggregate.computed"]
    assert [a["details"]["input_sites"] for a in aggregates] == [["hospital1", "hospital2", "hospital3", "hospital4"]] * 3
    assert [r["sites"]["hospital2"]["train_seconds"] for r in driver.state.rounds] == [9.0] * 3


class RefusingGrid(PushOrderGrid):
    """A loopback grid whose SuperLink refuses the second round's push ahead of the rest whole, as Flower's grid
    answers a push over its size limit: no message goes out and the id list is empty."""

    def push_messages(self, messages):
        messages = list(messages)
        if len(messages) == 1 and len(self.pushes) == 1:
            self.pushes.append([m.metadata.dst_node_id for m in messages])
            return []
        return super().push_messages(messages)


def test_a_push_refused_whole_leaves_the_other_silos_replies_with_their_own_nodes(tmp_path):
    """If only one of _push's two pushes is refused, the other's ids still belong to their own silos: the refused
    silo misses the round and every other silo's update is filed under its own name (they are all honest, so a
    misfiled reply would show as the wrong site aggregated)."""
    work = {1: 2.0, 2: 9.0, 3: 5.0}

    def silo(node, msg):
        content = honest(node, msg, {k: v * node for k, v in GOOD.items()})
        content[P.METRICS]["seconds"] = work[node]
        return content

    text = plan_text(rounds=2, update_norm_bound=10.0)
    grid = RefusingGrid([1, 2, 3], silo)
    driver = FederatedRun(grid, parse_plan(yaml.safe_load(text)), text, tmp_path / "run", "run-1", {k: v.copy() for k, v in INITIAL.items()})
    try:
        driver.execute()
    finally:
        driver.audit.close()
    assert grid.pushes[:3] == [[1, 2, 3], [2], [1, 3]]  # round 2: node 2's push refused, the rest sent
    with AuditLog.open(tmp_path / "run" / "audit", read_only=True) as log:
        records = list(log.records())
    aggregates = [r for r in records if r["event"] == "aggregate.computed"]
    assert [a["details"]["input_sites"] for a in aggregates] == [["hospital1", "hospital2", "hospital3"],
                                                                 ["hospital1", "hospital3"]]
    # Round 2: the missing silo is node 2 (hospital2), and each update came from its own node.
    missing = [(r["object"]["id"], r["details"]["site"]) for r in records if r["event"] == "update.missing"]
    assert missing == [("2", "hospital2")]
    received = [(r["details"]["site"], r["details"]["node"]) for r in records if r["event"] == "update.received" and r["round"] == 2]
    assert received == [("hospital1", "1"), ("hospital3", "3")]
    assert driver.node_site == {1: "hospital1", 2: "hospital2", 3: "hospital3"}


class PersonalizedGrid(LoopbackGrid):
    """Evaluate replies also carry each silo's personalized model's figures (training.personalize)."""

    def evaluation(self, node: int) -> dict:
        return {"dice": 0.5, "personalized-dice": 0.5 + 0.1 * node, "personalized-loss": 0.2, P.NUM_EXAMPLES: 4}


def test_personalized_figures_go_into_metrics_json_with_each_sites_gain(tmp_path):
    text = plan_text(rounds=1)
    driver = FederatedRun(PersonalizedGrid([1, 2], honest), parse_plan(yaml.safe_load(text)), text, tmp_path / "run", "run-1",
                          {k: v.copy() for k, v in INITIAL.items()})
    try:
        driver.execute()
    finally:
        driver.audit.close()
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    final = metrics["final"]
    assert final["dice_per_site"] == {"hospital1": 0.5, "hospital2": 0.5}
    assert final["personalized_dice_per_site"] == pytest.approx({"hospital1": 0.6, "hospital2": 0.7})
    assert final["personalized_dice_mean"] == pytest.approx(0.65)
    assert final["personalization_gain_dice_per_site"] == pytest.approx({"hospital1": 0.1, "hospital2": 0.2})
    assert metrics["rounds"][-1]["sites"]["hospital1"]["personalized_test_loss"] == pytest.approx(0.2)


def test_a_cosignature_counts_only_when_made_with_the_witness_key_of_the_site_the_node_is(tmp_path):
    """Each silo cosigns the checkpoint the next round's train message carries. Node 3 (hospital3) answers with a
    cosignature by hospital1's witness key, a key the coordinator trusts, but not hospital3's; node 4 cosigns the
    checkpoint as signed by a retired coordinator key. Both are refused and audited as failures, and nothing is
    filed as hospital3's or hospital4's; the honest silos' are kept."""
    from compliance.checkpoint import cosign_checkpoint, parse_note, sign_note
    from compliance.keys import generate_signer

    log_signer = generate_signer(tmp_path / "keys", "fedsilo.test/coordinator", role="log")
    retired = generate_signer(tmp_path / "retired", "fedsilo.test/coordinator", role="log")  # a rotated-out key, still in audit-trust/
    witnesses = {n: generate_signer(tmp_path / "keys", f"hospital{n}-witness", role="witness") for n in (1, 2, 3, 4)}
    cosigner = {1: witnesses[1], 2: witnesses[2], 3: witnesses[1], 4: witnesses[4]}  # node 3 passes hospital1's cosignature off as its own

    def silo(node, msg):
        content = honest(node, msg)
        if P.WITNESS in msg.content:
            note = msg.content[P.WITNESS][P.CHECKPOINT]
            if node == 4:  # the same checkpoint, but signed by the retired key (a leaked copy of it)
                note = sign_note(parse_note(note).text, retired)
            content[P.WITNESS] = ConfigRecord({P.COSIGNED: cosign_checkpoint(note, cosigner[node])})
        return content

    driver, records = run(tmp_path, silo, nodes=(1, 2, 3, 4), rounds=2, signer=log_signer,
                          witness_keys=[w.verifier for w in witnesses.values()] + [retired.verifier])
    cosigned = [r for r in records if r["event"] == "checkpoint.cosigned"]
    kept = {r["details"]["site"] for r in cosigned if r["outcome"] == "success"}
    refused = [r for r in cosigned if r["outcome"] == "failure"]
    assert kept == {"hospital1", "hospital2"}
    assert refused and {r["details"]["site"] for r in refused} == {"hospital3", "hospital4"}
    assert all("does not verify with its witness key" in r["reason"] for r in refused)
    assert set(driver.witnessed_size) == {"hospital1", "hospital2"}


class KeyedGrid(LoopbackGrid):
    """A grid with Flower's node records (``get_nodes``), as the deployment's grid has: each node's public key as
    the SuperLink stores it (the key it authenticated with). Records which nodes were sent anything."""

    def __init__(self, keys: dict[int, bytes], silo) -> None:
        super().__init__(sorted(keys), silo)
        self.keys = keys
        self.sent_to: set[int] = set()

    def get_nodes(self):
        from flwr.proto.node_pb2 import NodeInfo  # pylint: disable=no-name-in-module

        return [NodeInfo(node_id=n, public_key=key) for n, key in self.keys.items()]

    def push_messages(self, messages):
        messages = list(messages)
        self.sent_to |= {m.metadata.dst_node_id for m in messages}
        return super().push_messages(messages)


def _kit_keys(tmp_path, sites) -> dict[bytes, str]:
    """Real node key files as a coordinator kit holds them (sites/<site>.pub), read as the ServerApp reads them."""
    from coordinator.pki import create_node_key, load_node_keys

    folder = tmp_path / "sites"
    folder.mkdir()
    for site in sites:
        create_node_key(folder, site)
        (folder / f"{site}.key").unlink()  # a kit holds public keys only
    return load_node_keys(folder)


def test_each_nodes_site_is_its_kit_keys_and_a_reply_claiming_another_is_rejected(tmp_path):
    """Nodes 1 and 2 hold hospital1's and hospital2's kit keys; node 3 holds hospital3's but says it is hospital1;
    node 9's key (registered by someone else through the Control API) is in no kit: it is sent nothing."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    keys = _kit_keys(tmp_path, ["hospital1", "hospital2", "hospital3"])
    by_site = {site: key for key, site in keys.items()}
    stranger = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def silo(node, msg):
        content = honest(node, msg)
        if node == 3:
            content[P.IDENTITY][P.SITE] = "hospital1"
        return content

    grid = KeyedGrid({1: by_site["hospital1"], 2: by_site["hospital2"], 3: by_site["hospital3"], 9: stranger}, silo)
    _, records = run(tmp_path, silo, grid=grid, node_keys=keys)
    assert 9 not in grid.sent_to and grid.sent_to == {1, 2, 3}
    [denied] = [r for r in records if r["event"] == "node.started" and r["outcome"] == "denied"]
    assert denied["object"]["id"] == "9" and "none of the coordinator kit's site keys" in denied["reason"]
    [rejected] = [r for r in records if r["event"] == "update.rejected"]
    assert rejected["reason"] == "identity-mismatch" and rejected["object"]["id"] == "3"
    assert "node 3 holds the key of hospital3, its reply claims to be hospital1" in rejected["details"]["message"]
    aggregate = next(r for r in records if r["event"] == "aggregate.computed")
    assert aggregate["details"]["input_sites"] == ["hospital1", "hospital2"]
    started = [r for r in records if r["event"] == "node.started" and r["outcome"] == "success"]
    assert {r["details"]["site"] for r in started} == {"hospital1", "hospital2"}
    assert all("the coordinator kit's key of this site" in r["details"]["authenticated"] for r in started)


def test_without_kit_keys_a_replys_site_stands_but_one_site_sends_one_update(tmp_path):
    # The simulation engine's nodes have random keys: nothing to check a claim against, and the record says so. Two
    # nodes naming the same site still count once (the second reply is rejected).
    def silo(node, msg):
        content = honest(node, msg)
        if node == 3:
            content[P.IDENTITY][P.SITE] = "hospital1"
        return content

    _, records = run(tmp_path, silo, nodes=(1, 2, 3))
    [rejected] = [r for r in records if r["event"] == "update.rejected"]
    assert rejected["reason"] == "duplicate-site" and rejected["object"]["id"] == "3"
    started = [r for r in records if r["event"] == "node.started"]
    assert {r["details"]["site"] for r in started} == {"hospital1", "hospital2"}
    assert all("no site keys given to the coordinator" in r["details"]["authenticated"] for r in started)
