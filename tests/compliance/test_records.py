"""The record schema: what make_record builds and what check_record refuses."""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta, timezone

import pytest

from compliance.records import (EVENT_TYPES, GENESIS_PREV, EventType, chain_hash, check_record, format_time,
                                make_record, parse_time, utc_now)
from fedsilo.errors import ConfigError

ACTOR = {"kind": "silo", "id": "hospital0", "site": "hospital0", "role": "silo-agent", "key": "ed25519:" + "cd" * 32}
TIME = "2025-03-01T09:30:00.000000Z"


def _record(**overrides: object) -> dict:
    fields: dict = {"seq": 0, "prev": GENESIS_PREV, "actor": ACTOR, "time": TIME}
    fields.update(overrides)
    return make_record(fields.pop("event", EventType.PLAN_RECEIVED), **fields)


def test_make_record_fills_every_field() -> None:
    record = _record(object={"type": "plan", "id": "demo", "sha256": "ab" * 32}, run_id="run-1", round=2,
                     details={"cases": 12, "split": "training"}, source="silo@host fedsilo/0.1.0")
    assert record == {
        "schema": 2, "seq": 0, "event_id": record["event_id"], "time": TIME, "event": "plan.received",
        "actor": ACTOR, "source": "silo@host fedsilo/0.1.0", "object": {"type": "plan", "id": "demo", "sha256": "ab" * 32}, "run_id": "run-1",
        "round": 2, "outcome": "success", "reason": None, "details": {"cases": 12, "split": "training"},
        "prev": "0" * 64,
    }
    assert re.fullmatch(r"[0-9a-f]{32}", record["event_id"])


def test_defaults_time_now_fresh_event_id_actor_site_role_key_and_source() -> None:
    a = make_record(EventType.NODE_STARTED, seq=0, prev=GENESIS_PREV, actor={"kind": "coordinator", "id": "c"})
    b = make_record(EventType.NODE_STARTED, seq=0, prev=GENESIS_PREV, actor={"kind": "coordinator", "id": "c"})
    assert a["actor"] == {"kind": "coordinator", "id": "c", "site": None, "role": "coordinator", "key": None}
    assert re.fullmatch(r"fedsilo@\S+ fedsilo/\S+", a["source"])
    assert a["event_id"] != b["event_id"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", a["time"])


def test_the_event_types() -> None:
    assert EVENT_TYPES == {
        "node.registered", "plan.submitted", "plan.approved", "plan.rejected", "dataset.registered", "dataset.removed",
        "policy.changed", "config.changed", "run.started", "run.finished", "run.failed", "round.started", "round.finished", "update.received",
        "update.rejected", "aggregate.computed", "model.exported", "plan.received", "plan.refused", "dataset.used",
        "dp.spent", "update.sent", "node.started", "verification.run", "checkpoint.signed", "checkpoint.cosigned",
        "update.missing", "update.resent", "state.saved", "run.resumed",
    }


def test_unknown_event_type_lists_the_valid_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown event type 'run\.paused'; valid: aggregate\.computed, checkpoint\.cosigned"):
        _record(event="run.paused")


@pytest.mark.parametrize(("overrides", "message"), [
    ({"outcome": "ok"}, r"'outcome' is 'ok'; valid: success, failure, denied"),
    ({"seq": -1}, r"'seq' is -1; expected an integer >= 0"),
    ({"round": True}, r"'round' is True"),
    ({"round": 1.0}, r"'round' is 1\.0"),
    ({"run_id": ""}, r"'run_id' is ''"),
    ({"reason": 3}, r"'reason' is 3"),
    ({"prev": "0" * 63}, r"'prev' is .*SHA-256"),
    ({"prev": "A" * 64}, r"'prev' is .*lowercase hex"),
    ({"time": "2025-03-01T09:30:00Z"}, r"'time' is '2025-03-01T09:30:00Z', not UTC RFC 3339"),
    ({"time": "2025-03-01T09:30:00.000000+00:00"}, r"'time'"),
    ({"event_id": "not-a-uuid"}, r"'event_id'"),
    ({"actor": {"kind": "silo"}}, r"actor has missing fields \['id'\]"),
    ({"actor": {**ACTOR, "email": "x@y"}}, r"unknown fields \['email'\]"),
    ({"actor": {"kind": "silo", "id": None}}, r"'actor\.id' is None"),
    ({"actor": "hospital0"}, r"'actor' must be an object"),
    ({"actor": {**ACTOR, "role": ""}}, r"'actor\.role' is ''"),
    ({"actor": {**ACTOR, "key": "cd" * 32}}, r"'actor\.key' is .*'ed25519:<sha256 hex>'"),
    ({"actor": {**ACTOR, "key": "ed25519:" + "CD" * 32}}, r"'actor\.key'"),
    ({"source": ""}, r"'source' is ''"),
    ({"object": {"type": "update", "id": "u", "sha256": "xyz"}}, r"'object\.sha256' is 'xyz'"),
    ({"object": {"type": "update"}}, r"object has missing fields \['id', 'sha256'\]"),
    ({"details": [1]}, r"'details' must be an object or null"),
    ({"details": {"update": b"\x01\x02"}}, r"bytes at \$\.details\.update is not a JSON value"),
    ({"details": {"loss": math.nan}}, r"nan at \$\.details\.loss is not a JSON number"),
    ({"details": {"deep": [{"x": math.inf}]}}, r"inf at \$\.details\.deep\[0\]\.x"),
])
def test_bad_fields_are_refused_naming_the_field(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _record(**overrides)


def test_check_record_refuses_other_schemas_and_shapes() -> None:
    record = _record()
    with pytest.raises(ConfigError, match=r"record schema 1 is not supported"):
        check_record({**record, "schema": 1})
    with pytest.raises(ConfigError, match=r"unknown fields \['extra'\]"):
        check_record({**record, "extra": 1})
    with pytest.raises(ConfigError, match=r"a record is a JSON object, not list"):
        check_record([record])


def test_chain_hash_is_sha256_hex() -> None:
    # FIPS 180-2 appendix B.1: SHA-256("abc").
    assert chain_hash(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_times_are_utc_with_microseconds() -> None:
    cet = timezone(timedelta(hours=1))
    assert format_time(datetime(2025, 3, 1, 10, 30, 0, 5, tzinfo=cet)) == "2025-03-01T09:30:00.000005Z"
    assert parse_time(TIME) == datetime(2025, 3, 1, 9, 30, tzinfo=timezone.utc)
    assert parse_time(utc_now()).tzinfo == timezone.utc
