"""The audit record, schema 2: one event, its actor, source and object, chained to the previous record.

A record is a plain dict; its bytes are ``canonical_json(record)`` (RFC 8785) and its chain hash is
SHA-256 (FIPS 180-4) of those bytes, in lowercase hex. ``prev`` holds the chain hash of the record
before it (64 zeros for seq 0), so editing, removing or reordering a record breaks the chain.
Times are UTC in RFC 3339 form with microseconds and "Z", e.g. ``2025-03-01T09:30:00.000000Z``.

Schema 2 (schema 1 plus): the actor's ``role`` and ``key`` (the fingerprint of the key that
authenticates it, ``ed25519:<sha256 hex>``, or null) and the record's ``source`` (the component and
host that wrote it). Who did what, in which capacity, proven by which key, seen from where: the
attribution HIPAA 164.312(b) audit controls and 164.312(d) person or entity authentication ask for.
"""

from __future__ import annotations

import hashlib
import re
import socket
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from compliance.canonical import canonical_json
from fedsilo import __version__
from fedsilo.errors import ConfigError

SCHEMA_VERSION = 2
GENESIS_PREV = "0" * 64
OUTCOMES = ("success", "failure", "denied")
FIELDS = ("schema", "seq", "event_id", "time", "event", "actor", "source", "object", "run_id", "round", "outcome",
          "reason", "details", "prev")
ACTOR_FIELDS = ("kind", "id", "site", "role", "key")
OBJECT_FIELDS = ("type", "id", "sha256")
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"

_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_KEY = re.compile(r"[a-z0-9-]{1,16}:[0-9a-f]{64}")


class EventType:
    """The event types a record may carry; anything else is refused."""

    NODE_REGISTERED = "node.registered"
    PLAN_SUBMITTED = "plan.submitted"
    PLAN_APPROVED = "plan.approved"
    PLAN_REJECTED = "plan.rejected"
    DATASET_REGISTERED = "dataset.registered"
    DATASET_REMOVED = "dataset.removed"
    POLICY_CHANGED = "policy.changed"
    CONFIG_CHANGED = "config.changed"
    RUN_STARTED = "run.started"
    RUN_FINISHED = "run.finished"
    RUN_FAILED = "run.failed"
    ROUND_STARTED = "round.started"
    ROUND_FINISHED = "round.finished"
    UPDATE_RECEIVED = "update.received"
    UPDATE_REJECTED = "update.rejected"
    UPDATE_SENT = "update.sent"
    AGGREGATE_COMPUTED = "aggregate.computed"
    MODEL_EXPORTED = "model.exported"
    PLAN_RECEIVED = "plan.received"
    PLAN_REFUSED = "plan.refused"
    DATASET_USED = "dataset.used"
    DP_SPENT = "dp.spent"
    NODE_STARTED = "node.started"
    VERIFICATION_RUN = "verification.run"
    CHECKPOINT_SIGNED = "checkpoint.signed"
    CHECKPOINT_COSIGNED = "checkpoint.cosigned"
    UPDATE_MISSING = "update.missing"  # a silo sent no reply within the round's timeout
    UPDATE_RESENT = "update.resent"  # a silo re-sent the update it already trained for a retried round
    STATE_SAVED = "state.saved"  # the coordinator's run state (global model, optimizer, round), or a silo's personalized model, on disk
    RUN_RESUMED = "run.resumed"


EVENT_TYPES = frozenset(value for name, value in vars(EventType).items() if name.isupper())


def chain_hash(leaf: bytes) -> str:
    """SHA-256 of a record's canonical bytes, lowercase hex: the value the next record's ``prev`` holds."""
    return hashlib.sha256(leaf).hexdigest()


def format_time(moment: datetime) -> str:
    """A timezone-aware datetime as UTC RFC 3339 with microseconds and "Z"."""
    return moment.astimezone(timezone.utc).strftime(TIME_FORMAT)


def default_source(component: str) -> str:
    """``<component>@<host> fedsilo/<version>``: which program on which machine wrote a record."""
    return f"{component}@{socket.gethostname() or 'unknown-host'} fedsilo/{__version__}"


def utc_now() -> str:
    """The current time in the record format."""
    return format_time(datetime.now(timezone.utc))


def parse_time(text: str) -> datetime:
    """Parse a record time; only the exact record format is accepted (RFC 3339, microseconds, "Z")."""
    # The regex fixes the layout (what strptime plus a round trip used to check, ten times faster);
    # fromisoformat checks the ranges (month 1-12, day of that month, hour 0-23, ...).
    moment = None
    if isinstance(text, str) and _TIME.fullmatch(text):
        try:
            moment = datetime.fromisoformat(text[:-1]).replace(tzinfo=timezone.utc)
        except ValueError:
            moment = None
    if moment is None:
        raise ConfigError(f"record field 'time' is {text!r}, not UTC RFC 3339 like '2025-03-01T09:30:00.000000Z'")
    return moment


def make_record(event: str, *, seq: int, prev: str, actor: Mapping[str, Any], source: str | None = None,
                object: Mapping[str, Any] | None = None,
                run_id: str | None = None, round: int | None = None, outcome: str = "success",
                reason: str | None = None, details: Mapping[str, Any] | None = None, time: str | None = None,
                event_id: str | None = None) -> dict[str, Any]:
    """Build and check one record (schema 2).

    Args:
        event: one of :class:`EventType`.
        seq: the record's position in its log, from 0.
        prev: the chain hash of the record at ``seq - 1``; :data:`GENESIS_PREV` for seq 0.
        actor: ``{"kind": "coordinator" | "silo" | "person" | ..., "id": str, "site": str | None, "role": str,
            "key": "ed25519:<sha256 hex>" | None}``; ``site`` and ``key`` may be left out (null), ``role``
            defaults to ``kind`` (services whose kind is their role).
        source: the component and host that wrote the record; defaults to ``default_source("fedsilo")``.
        object: what the event is about, ``{"type": str, "id": str, "sha256": hex | None}``, or None.
        run_id, round: the run and round the event belongs to, or None.
        outcome: "success", "failure" or "denied".
        reason: why, for failures and denials (one line, no PHI).
        details: JSON values only (no bytes, NaN or Infinity).
        time: defaults to now (UTC).
        event_id: defaults to a fresh uuid4 hex.

    Raises:
        ConfigError: naming the field that is wrong and the valid values.
    """
    record = {
        "schema": SCHEMA_VERSION,
        "seq": seq,
        "event_id": event_id if event_id is not None else uuid.uuid4().hex,
        "time": time if time is not None else utc_now(),
        "event": event,
        "actor": {"site": None, "role": actor.get("kind"), "key": None, **actor} if isinstance(actor, Mapping) else actor,
        "source": source if source is not None else default_source("fedsilo"),
        "object": dict(object) if isinstance(object, Mapping) else object,
        "run_id": run_id,
        "round": round,
        "outcome": outcome,
        "reason": reason,
        "details": dict(details) if isinstance(details, Mapping) else details,
        "prev": prev,
    }
    check_record(record)
    return record


def check_record(record: Any) -> None:
    """Check that ``record`` follows schema 2: the fields, their types and their allowed values.

    Raises:
        ConfigError: naming the first field that is wrong.
    """
    if not isinstance(record, Mapping):
        raise ConfigError(f"a record is a JSON object, not {type(record).__name__}")
    _exact_keys(record, FIELDS, "record")
    if record["schema"] != SCHEMA_VERSION or isinstance(record["schema"], bool):
        raise ConfigError(f"record schema {record['schema']!r} is not supported (this version reads schema {SCHEMA_VERSION})")
    if not isinstance(record["event"], str) or record["event"] not in EVENT_TYPES:
        raise ConfigError(f"unknown event type {record['event']!r}; valid: {', '.join(sorted(EVENT_TYPES))}")
    if record["outcome"] not in OUTCOMES:
        raise ConfigError(f"record field 'outcome' is {record['outcome']!r}; valid: {', '.join(OUTCOMES)}")
    _int(record["seq"], "seq", optional=False)
    _int(record["round"], "round", optional=True)
    _match(record["event_id"], _HEX32, "event_id", "a uuid4 in hex (32 characters)")
    _match(record["prev"], _HEX64, "prev", "a SHA-256 in lowercase hex")
    parse_time(record["time"])
    _text(record["run_id"], "run_id", optional=True)
    _text(record["reason"], "reason", optional=True)

    actor = record["actor"]
    if not isinstance(actor, Mapping):
        raise ConfigError("record field 'actor' must be an object {kind, id, site, role, key}")
    _exact_keys(actor, ACTOR_FIELDS, "actor")
    _text(actor["kind"], "actor.kind", optional=False)
    _text(actor["id"], "actor.id", optional=False)
    _text(actor["site"], "actor.site", optional=True)
    _text(actor["role"], "actor.role", optional=False)
    if actor["key"] is not None:
        _match(actor["key"], _KEY, "actor.key", "a key fingerprint like 'ed25519:<sha256 hex>', or null")
    _text(record["source"], "source", optional=False)

    obj = record["object"]
    if obj is not None:
        if not isinstance(obj, Mapping):
            raise ConfigError("record field 'object' must be an object {type, id, sha256} or null")
        _exact_keys(obj, OBJECT_FIELDS, "object")
        _text(obj["type"], "object.type", optional=False)
        _text(obj["id"], "object.id", optional=False)
        if obj["sha256"] is not None:
            _match(obj["sha256"], _HEX64, "object.sha256", "a SHA-256 in lowercase hex, or null")

    details = record["details"]
    if details is not None:
        if not isinstance(details, Mapping):
            raise ConfigError("record field 'details' must be an object or null")
        canonical_json({"details": details})  # JSON values only; the error names the key path


def _exact_keys(mapping: Mapping[str, Any], fields: tuple[str, ...], where: str) -> None:
    missing = [f for f in fields if f not in mapping]
    unknown = sorted(str(k) for k in mapping if k not in fields)
    if missing or unknown:
        raise ConfigError(f"{where} has missing fields {missing} and unknown fields {unknown}; "
                          f"expected exactly {', '.join(fields)}")


def _int(value: Any, field: str, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"record field '{field}' is {value!r}; expected an integer >= 0"
                          + (" or null" if optional else ""))


def _text(value: Any, field: str, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or not value:
        raise ConfigError(f"record field '{field}' is {value!r}; expected a non-empty string"
                          + (" or null" if optional else ""))


def _match(value: Any, pattern: re.Pattern[str], field: str, expected: str) -> None:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise ConfigError(f"record field '{field}' is {value!r}; expected {expected}")
