"""AuditLog over a real SQLite file: append, durability, resume, batches, reading and export."""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

import compliance.audit_log as audit_log_module
from compliance import AuditLog, EventType, canonical_json, verify_log
from compliance.audit_log import DB_NAME, PAGE_ROWS, Head
from compliance.records import GENESIS_PREV
from fedsilo.errors import ConfigError, VerificationError


def _stored(path: Path) -> list[tuple[int, bytes, str]]:
    """The rows as another connection sees them."""
    with sqlite3.connect(path / DB_NAME) as conn:
        return [(s, bytes(leaf), h) for s, leaf, h in conn.execute("SELECT seq, leaf, hash FROM records ORDER BY seq")]


def test_open_creates_the_folder_and_database(tmp_path: Path) -> None:
    path = tmp_path / "runs" / "demo" / "audit"
    with AuditLog.open(path) as log:
        assert len(log) == 0 and log.head() is None
    with sqlite3.connect(path / DB_NAME) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA user_version").fetchone() == (2,)

        def columns(table: str) -> list[tuple]:
            return [(name, kind, notnull, pk) for _, name, kind, notnull, _, pk in conn.execute(f"PRAGMA table_info({table})")]

        assert columns("records") == [("seq", "INTEGER", 0, 1), ("leaf", "BLOB", 1, 0), ("hash", "TEXT", 1, 0)]
        assert columns("checkpoints") == [("size", "INTEGER", 0, 1), ("root", "BLOB", 1, 0), ("note", "BLOB", 1, 0)]
        origin = conn.execute("SELECT value FROM meta WHERE key = 'origin'").fetchone()[0]
    assert origin.startswith("fedsilo-audit/") and len(origin) == len("fedsilo-audit/") + 32


@pytest.mark.parametrize("kwargs", [{"create": False}, {"read_only": True}])
def test_a_missing_log_is_a_config_error_with_the_fix(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ConfigError) as info:
        AuditLog.open(tmp_path / "nope", **kwargs)
    assert info.value.one_line() == (f"no audit log at {tmp_path / 'nope'} "
                                     "(fix: pass the run's audit/ folder, e.g. runs/demo/audit)")
    assert not (tmp_path / "nope").exists()


def test_a_file_is_not_a_log_folder(tmp_path: Path) -> None:
    (tmp_path / "audit").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not an audit log folder"):
        AuditLog.open(tmp_path / "audit")


def test_a_database_of_another_layout_is_refused(tmp_path: Path) -> None:
    (tmp_path / "audit").mkdir()
    with sqlite3.connect(tmp_path / "audit" / DB_NAME) as conn:
        conn.execute("PRAGMA user_version=7")
    with pytest.raises(ConfigError, match="layout version 7; this fedsilo reads versions 1, 2"):
        AuditLog.open(tmp_path / "audit")


@pytest.mark.parametrize("read_only", [False, True])
def test_a_file_that_is_not_sqlite_is_refused(tmp_path: Path, read_only: bool) -> None:
    (tmp_path / "audit").mkdir()
    (tmp_path / "audit" / DB_NAME).write_bytes(b"not a database " * 100)
    with pytest.raises(ConfigError, match="is not a readable audit log"):
        AuditLog.open(tmp_path / "audit", read_only=read_only)


def test_append_chains_records_and_is_durable_at_return(tmp_path: Path, actor: dict) -> None:
    path = tmp_path / "audit"
    with AuditLog.open(path) as log:
        first = log.append(EventType.RUN_STARTED, actor=actor, run_id="run-1")
        second = log.append(EventType.ROUND_STARTED, actor=actor, run_id="run-1", round=1, details={"nodes": 2})
        rows = _stored(path)  # read by another connection while the log is still open
    assert (first["seq"], first["prev"]) == (0, GENESIS_PREV)
    assert rows[0] == (0, canonical_json(first), hashlib.sha256(canonical_json(first)).hexdigest())
    assert second["seq"] == 1 and second["prev"] == rows[0][2]
    assert rows[1][1] == canonical_json(second)


def test_reopening_resumes_the_chain(make_log: Callable[..., Path], actor: dict) -> None:
    path = make_log(3)
    last_hash = _stored(path)[-1][2]
    with AuditLog.open(path, create=False) as log:
        assert log.head() == Head(2, last_hash)
        record = log.append(EventType.RUN_FINISHED, actor=actor, run_id="run-1")
    assert (record["seq"], record["prev"]) == (3, last_hash)
    assert verify_log(path).records == 4


def test_reading_back(make_log: Callable[..., Path]) -> None:
    path = make_log(5)
    rows = _stored(path)
    with AuditLog.open(path, read_only=True) as log:
        assert len(log) == 5
        assert [canonical_json(r) for r in log.records()] == [leaf for _, leaf, _ in rows]
        assert [r["seq"] for r in log.records(tail=2)] == [3, 4]
        assert [r["seq"] for r in log.records(tail=50)] == [0, 1, 2, 3, 4]
        assert list(log.rows()) == rows
        with pytest.raises(ConfigError, match="tail must be at least 1"):
            list(log.rows(tail=0))


def test_a_read_only_log_refuses_appends(make_log: Callable[..., Path], actor: dict) -> None:
    with AuditLog.open(make_log(1), read_only=True) as log:
        with pytest.raises(ConfigError, match="open read-only"):
            log.append(EventType.RUN_FINISHED, actor=actor)


def test_a_bad_append_leaves_the_log_unchanged(make_log: Callable[..., Path], actor: dict) -> None:
    path = make_log(2)
    with AuditLog.open(path) as log:
        with pytest.raises(ConfigError, match=r"nan at \$\.details\.loss"):
            log.append(EventType.DP_SPENT, actor=actor, details={"loss": float("nan")})
        with pytest.raises(ConfigError, match="unknown event type"):
            log.append("run.paused", actor=actor)
        assert len(log) == 2
        assert log.append(EventType.RUN_FINISHED, actor=actor)["seq"] == 2
    assert verify_log(path).records == 3


def test_2000_records_in_one_batch(tmp_path: Path, actor: dict) -> None:
    path = tmp_path / "audit"
    n = 2 * PAGE_ROWS
    with AuditLog.open(path) as log:
        with log.batch():
            for i in range(n):
                log.append(EventType.UPDATE_RECEIVED, actor=actor, run_id="run-1", round=1 + i // 100,
                           object={"type": "update", "id": f"site{i % 100}/{1 + i // 100}", "sha256": "cd" * 32})
        assert len(log) == n and log.head().seq == n - 1
    result = verify_log(path)
    assert result.records == n and result.events == {"update.received": n}


def test_a_batch_that_raises_writes_nothing(make_log: Callable[..., Path], actor: dict) -> None:
    path = make_log(1)
    with AuditLog.open(path) as log:
        with pytest.raises(RuntimeError), log.batch():
            log.append(EventType.ROUND_STARTED, actor=actor, round=1)
            log.append(EventType.ROUND_FINISHED, actor=actor, round=1)
            raise RuntimeError("crash inside the batch")
        assert len(log) == 1
        with pytest.raises(ConfigError, match="do not nest"), log.batch(), log.batch():
            pass
        assert log.append(EventType.RUN_FINISHED, actor=actor)["seq"] == 1
    assert verify_log(path).records == 2


def test_times_never_go_backwards_when_the_clock_steps_back(tmp_path: Path, actor: dict,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "audit"
    with AuditLog.open(path) as log:
        monkeypatch.setattr(audit_log_module, "utc_now", lambda: "2025-03-01T09:30:00.000000Z")
        log.append(EventType.RUN_STARTED, actor=actor)
        monkeypatch.setattr(audit_log_module, "utc_now", lambda: "2025-03-01T09:29:59.000000Z")
        record = log.append(EventType.RUN_FINISHED, actor=actor)
    assert record["time"] == "2025-03-01T09:30:00.000000Z"
    assert verify_log(path).records == 2


def test_export_writes_the_exact_leaves_which_rehash_to_the_chain(make_log: Callable[..., Path],
                                                                   tmp_path: Path) -> None:
    path = make_log(4)
    rows = _stored(path)
    out = tmp_path / "export.jsonl"
    with AuditLog.open(path, read_only=True) as log:
        assert log.export_jsonl(out) == 4
    data = out.read_bytes()
    assert data == b"".join(leaf + b"\n" for _, leaf, _ in rows)
    lines = data.splitlines()
    hashes = [hashlib.sha256(line).hexdigest() for line in lines]
    assert hashes == [h for _, _, h in rows]
    assert [json.loads(line)["prev"] for line in lines] == [GENESIS_PREV, *hashes[:-1]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export.jsonl", "run"]  # no partial file left


def test_export_into_a_missing_folder_is_a_config_error(make_log: Callable[..., Path], tmp_path: Path) -> None:
    with AuditLog.open(make_log(1)) as log, pytest.raises(ConfigError, match="does not exist"):
        log.export_jsonl(tmp_path / "missing" / "out.jsonl")


def test_an_unreadable_tail_stops_appends(make_log: Callable[..., Path], actor: dict) -> None:
    path = make_log(2)
    with sqlite3.connect(path / DB_NAME) as conn:
        conn.execute("UPDATE records SET leaf = ? WHERE seq = 1", (b"garbage",))
    with AuditLog.open(path) as log, pytest.raises(VerificationError, match=r"last record \(seq 1\).*unreadable"):
        log.append(EventType.RUN_FINISHED, actor=actor)
