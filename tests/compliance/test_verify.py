"""verify_log: an intact log passes; every way of tampering is caught at the right seq.

The log is a real SQLite file; each test edits rows directly with sqlite3, as an attacker with
write access to the file would.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from compliance import AuditVerificationError, canonical_json, verify_log
from compliance.audit_log import DB_NAME, AuditLog
from fedsilo.errors import ConfigError, VerificationError

N = 10


@pytest.fixture
def path(make_log: Callable[..., Path]) -> Path:
    return make_log(N)


@pytest.fixture
def db(path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(path / DB_NAME)
    yield conn
    conn.close()


def _leaf(db: sqlite3.Connection, seq: int) -> bytes:
    return bytes(db.execute("SELECT leaf FROM records WHERE seq = ?", (seq,)).fetchone()[0])


def _hash(db: sqlite3.Connection, seq: int) -> str:
    return db.execute("SELECT hash FROM records WHERE seq = ?", (seq,)).fetchone()[0]


def _write(db: sqlite3.Connection, seq: int, leaf: bytes, *, rehash: bool = True) -> None:
    digest = hashlib.sha256(leaf).hexdigest() if rehash else _hash(db, seq)
    db.execute("UPDATE records SET leaf = ?, hash = ? WHERE seq = ?", (leaf, digest, seq))
    db.commit()


def _edit(db: sqlite3.Connection, row: int, **fields: object) -> None:
    """Rewrite the fields of the record in ``row``, keeping the leaf canonical and its stored hash consistent."""
    _write(db, row, canonical_json({**json.loads(_leaf(db, row)), **fields}))


def _rechain(db: sqlite3.Connection, start: int) -> None:
    """Repair every prev link from ``start`` on, as a forger who knows the scheme would."""
    for seq in range(start, N):
        _edit(db, seq, prev=_hash(db, seq - 1))


def _broken(path: Path) -> AuditVerificationError:
    with pytest.raises(AuditVerificationError) as info:
        verify_log(path)
    return info.value


def test_an_intact_log_verifies(path: Path, db: sqlite3.Connection) -> None:
    result = verify_log(path)
    assert result.records == N
    assert result.head == _hash(db, N - 1)
    assert result.first_time == json.loads(_leaf(db, 0))["time"]
    assert result.last_time == json.loads(_leaf(db, N - 1))["time"]
    assert result.events == {"round.started": N - 1, "run.started": 1}


def test_an_empty_log_fails(tmp_path: Path) -> None:
    AuditLog.open(tmp_path / "audit").close()
    err = _broken(tmp_path / "audit")
    assert (err.seq, err.reason) == (0, "no records")


def test_a_missing_log_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no audit log at"):
        verify_log(tmp_path / "nope")


def test_a_flipped_byte_in_a_field(path: Path, db: sqlite3.Connection) -> None:
    leaf = _leaf(db, 4)
    assert b'"run_id":"run-1"' in leaf
    _write(db, 4, leaf.replace(b'"run_id":"run-1"', b'"run_id":"run-3"'), rehash=False)
    err = _broken(path)
    assert (err.seq, err.reason) == (4, "stored hash does not match the leaf")
    assert (err.expected, err.got) == (hashlib.sha256(_leaf(db, 4)).hexdigest(), _hash(db, 4))


def test_an_edited_stored_hash(path: Path, db: sqlite3.Connection) -> None:
    db.execute("UPDATE records SET hash = ? WHERE seq = 6", ("f" * 64,))
    db.commit()
    assert _broken(path).seq == 6


def test_a_deleted_record(path: Path, db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM records WHERE seq = 4")
    db.commit()
    err = _broken(path)
    assert (err.seq, err.reason, err.expected, err.got) == (4, "seq gap, a record was removed", "4", "5")


def test_a_deleted_record_with_later_rows_renumbered(path: Path, db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM records WHERE seq = 4")
    db.execute("UPDATE records SET seq = seq - 1 WHERE seq > 4")
    db.commit()
    err = _broken(path)
    assert (err.seq, err.reason, err.expected, err.got) == (4, "seq field does not match the row", "4", "5")


def test_a_deleted_record_with_later_records_renumbered_and_rehashed(path: Path, db: sqlite3.Connection) -> None:
    removed = _hash(db, 4)
    db.execute("DELETE FROM records WHERE seq = 4")
    db.execute("UPDATE records SET seq = seq - 1 WHERE seq > 4")
    for seq in range(4, N - 1):
        _edit(db, seq, seq=seq)
    err = _broken(path)
    assert (err.seq, err.reason, err.expected, err.got) == (4, "prev hash mismatch", _hash(db, 3), removed)


def test_two_records_swapped(path: Path, db: sqlite3.Connection) -> None:
    (leaf3, hash3), (leaf4, hash4) = (_leaf(db, 3), _hash(db, 3)), (_leaf(db, 4), _hash(db, 4))
    db.execute("UPDATE records SET leaf = ?, hash = ? WHERE seq = 3", (leaf4, hash4))
    db.execute("UPDATE records SET leaf = ?, hash = ? WHERE seq = 4", (leaf3, hash3))
    db.commit()
    assert _broken(path).seq == 3


def test_an_edited_record_rehashed_is_caught_by_the_next_prev(path: Path, db: sqlite3.Connection) -> None:
    original = _hash(db, 4)
    _edit(db, 4, details={"nodes": 30})
    err = _broken(path)
    assert (err.seq, err.reason, err.expected, err.got) == (5, "prev hash mismatch", _hash(db, 4), original)
    assert str(err).startswith(f"audit log broken at seq 5: prev hash mismatch "
                               f"(expected {_hash(db, 4)[:12]}..., found {original[:12]}...)")


def test_a_non_canonical_leaf_with_the_same_content(path: Path, db: sqlite3.Connection) -> None:
    _write(db, 4, json.dumps(json.loads(_leaf(db, 4)), indent=1).encode())
    err = _broken(path)
    assert err.seq == 4 and "not canonical JSON" in err.reason


def test_a_leaf_that_is_not_json(path: Path, db: sqlite3.Connection) -> None:
    _write(db, 2, b"\x00garbage")
    err = _broken(path)
    assert err.seq == 2 and err.reason.startswith("leaf is not JSON")


def test_time_going_backwards(path: Path, db: sqlite3.Connection) -> None:
    _edit(db, 5, time="2000-01-01T00:00:00.000000Z")
    _rechain(db, 6)  # the chain itself is repaired, only the time order is wrong
    err = _broken(path)
    assert (err.seq, err.reason, err.got) == (5, "time goes backwards", "2000-01-01T00:00:00.000000Z")


def test_an_unknown_event_type(path: Path, db: sqlite3.Connection) -> None:
    _edit(db, 4, event="round.skipped")
    _rechain(db, 5)
    err = _broken(path)
    assert err.seq == 4 and err.reason.startswith("invalid record: unknown event type 'round.skipped'")


def test_an_unknown_schema(path: Path, db: sqlite3.Connection) -> None:
    _edit(db, 0, schema=1)  # schema 1 had no role, key or source
    _rechain(db, 1)
    err = _broken(path)
    assert err.seq == 0 and err.reason.startswith("invalid record: record schema 1 is not supported")


def test_a_wrong_genesis_prev(path: Path, db: sqlite3.Connection) -> None:
    _edit(db, 0, prev="1" * 64)
    _rechain(db, 1)
    err = _broken(path)
    assert (err.seq, err.expected, err.got) == (0, "0" * 64, "1" * 64)


def test_the_error_is_a_one_line_verification_error(path: Path, db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM records WHERE seq = 7")
    db.commit()
    err = _broken(path)
    assert isinstance(err, VerificationError) and err.exit_code == 1
    assert err.one_line() == ("audit log broken at seq 7: seq gap, a record was removed (expected 7, found 8) "
                              "(fix: records from seq 7 on cannot be trusted; compare them with an earlier export "
                              "(fedsilo audit export))")


def test_limit_cutting_the_tail_needs_signed_checkpoints(path: Path, db: sqlite3.Connection) -> None:
    # A hash chain alone cannot show that the last records were removed: signed checkpoints (Merkle root and
    # size) and the witnesses' copies exist for this (test_verify_checkpoints.py). Without them the cut passes,
    # and the result says that nothing anchors the records.
    db.execute("DELETE FROM records WHERE seq >= 8")
    db.commit()
    result = verify_log(path)
    assert (result.records, result.anchored, result.unanchored) == (8, 0, 8)
