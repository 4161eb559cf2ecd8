"""Verify an audit log: every record canonical (RFC 8785), hashed (SHA-256) and chained to the one before.

Verification raises at the first record that is not intact; it never returns a falsy result that a
caller could forget to check. What a hash chain alone cannot show: that records were cut from the
END of the log, or that the whole log was rewritten. Signed checkpoints (a later layer) cover that.
"""

from __future__ import annotations

import re
import sqlite3
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compliance.audit_log import AuditLog
from compliance.canonical import parse_canonical
from compliance.records import GENESIS_PREV, chain_hash, check_record
from fedsilo.errors import ConfigError, VerificationError

_HEX64 = re.compile(r"[0-9a-f]{64}")


class AuditVerificationError(VerificationError):
    """The audit log is not intact at record ``seq``.

    Attributes:
        seq: the first record that failed.
        reason: what failed, e.g. "prev hash mismatch".
        expected, got: the value the chain requires and the value found (None where not applicable).
    """

    def __init__(self, reason: str, *, seq: int, expected: str | None = None, got: str | None = None) -> None:
        self.seq = seq
        self.reason = reason
        self.expected = expected
        self.got = got
        message = f"audit log broken at seq {seq}: {reason}"
        if expected is not None or got is not None:
            message += f" (expected {_short(expected)}, found {_short(got)})"
        super().__init__(message, fix=f"records from seq {seq} on cannot be trusted; compare them with an earlier "
                                      "export (fedsilo audit export)")


@dataclass(frozen=True)
class VerifyResult:
    """What an intact log holds."""

    records: int
    head: str
    first_time: str
    last_time: str
    events: dict[str, int]


def verify_log(path: str | Path) -> VerifyResult:
    """Check every record of the log in folder ``path``, in seq order; raise at the first bad one.

    For each row:
      1. its seq is the next one (0, 1, 2, ...): no record removed;
      2. its stored hash equals SHA-256 of its leaf bytes;
      3. the leaf is canonical JSON (RFC 8785);
      4. the record follows its schema (known schema version, known event type, field types);
      5. the record's ``seq`` field equals the row's seq;
      6. the record's ``prev`` equals the hash of the previous leaf (64 zeros at seq 0);
      7. its time is not before the previous record's time.
    An empty log fails too.

    Raises:
        ConfigError: there is no audit log at ``path``.
        AuditVerificationError: a record is not intact (seq, reason, expected and found values).
    """
    with AuditLog.open(path, read_only=True) as log:
        return _verify_rows(log.rows())


def _verify_rows(rows: Iterator[tuple[int, bytes, str]]) -> VerifyResult:
    expected_seq, prev, first_time, last_time = 0, GENESIS_PREV, "", ""
    events: Counter[str] = Counter()
    while True:
        try:
            row = next(rows, None)
        except sqlite3.DatabaseError as exc:
            raise AuditVerificationError(f"database unreadable ({exc})", seq=expected_seq) from None
        if row is None:
            break
        seq, leaf, stored = row
        # 1. no gap
        if seq != expected_seq:
            raise AuditVerificationError("seq gap, a record was removed", seq=expected_seq, expected=str(expected_seq),
                                         got=str(seq))
        # 2. stored hash
        digest = chain_hash(leaf)
        if stored != digest:
            raise AuditVerificationError("stored hash does not match the leaf", seq=seq, expected=digest, got=str(stored))
        # 3. canonical bytes
        try:
            record: Any = parse_canonical(leaf)
        except ConfigError as exc:
            raise AuditVerificationError(f"leaf is {exc.message}", seq=seq) from None
        # 4. schema
        try:
            check_record(record)
        except ConfigError as exc:
            raise AuditVerificationError(f"invalid record: {exc.message}", seq=seq) from None
        # 5. seq field
        if record["seq"] != seq:
            raise AuditVerificationError("seq field does not match the row", seq=seq, expected=str(seq),
                                         got=str(record["seq"]))
        # 6. chain link
        if record["prev"] != prev:
            raise AuditVerificationError("prev hash mismatch", seq=seq, expected=prev, got=record["prev"])
        # 7. time order (the fixed-width record format sorts like the times it names)
        if record["time"] < last_time:
            raise AuditVerificationError("time goes backwards", seq=seq, expected=f">= {last_time}", got=record["time"])
        first_time = first_time or record["time"]
        last_time = record["time"]
        events[record["event"]] += 1
        prev = digest
        expected_seq += 1
    if expected_seq == 0:
        raise AuditVerificationError("no records", seq=0, expected="at least 1 record", got="0")
    return VerifyResult(records=expected_seq, head=prev, first_time=first_time, last_time=last_time,
                        events=dict(sorted(events.items())))


def _short(value: str | None) -> str:
    """Abbreviate a SHA-256 hex digest to 12 characters for one-line messages."""
    if value is not None and _HEX64.fullmatch(value):
        return value[:12] + "..."
    return str(value)
