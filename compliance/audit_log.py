"""An append-only audit log in SQLite: canonical records (RFC 8785) linked by a SHA-256 hash chain.

The log is a folder (e.g. ``runs/demo/audit/``) holding ``audit.sqlite`` with one table::

    records(seq INTEGER PRIMARY KEY, leaf BLOB NOT NULL, hash TEXT NOT NULL)

``leaf`` is the exact canonical bytes of a record and ``hash`` is SHA-256 of ``leaf`` in hex. The
database runs in WAL mode with ``synchronous=FULL``, so a record is on disk when ``append`` returns.
Several processes may append to the same log: each append reads the tail inside a
``BEGIN IMMEDIATE`` transaction, which SQLite serializes. The leaves are kept byte for byte, so a
later Merkle tree (RFC 6962) can be built over them without rewriting the log.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from compliance.canonical import canonical_json
from compliance.records import GENESIS_PREV, chain_hash, make_record, utc_now
from fedsilo.errors import ConfigError, VerificationError

DB_NAME = "audit.sqlite"
# PRAGMA user_version of the database layout; a later layout (Merkle tree, checkpoints) bumps it.
DB_FORMAT = 1
# How long an append waits for another process's transaction before giving up.
BUSY_TIMEOUT_S = 60.0
# Rows read per query; keeps memory flat on long logs without holding a read cursor open.
PAGE_ROWS = 1000
MISSING_FIX = "pass the run's audit/ folder, e.g. runs/demo/audit"

_SCHEMA = "CREATE TABLE IF NOT EXISTS records(seq INTEGER PRIMARY KEY, leaf BLOB NOT NULL, hash TEXT NOT NULL)"


class Head(NamedTuple):
    """The last record of a log: its seq and its chain hash."""

    seq: int
    hash: str


class _Tail(NamedTuple):
    next_seq: int
    prev: str
    time: str


class AuditLog:
    """An open audit log; create it with :meth:`AuditLog.open`.

    Example::

        with AuditLog.open(run_dir / "audit") as log:
            log.append(EventType.RUN_STARTED, actor={"kind": "coordinator", "id": "coordinator"}, run_id="r1")
    """

    def __init__(self, folder: Path, conn: sqlite3.Connection, *, read_only: bool) -> None:
        self.path = folder
        self.read_only = read_only
        self._conn = conn
        self._tail: _Tail | None = None  # set while a transaction is open

    @classmethod
    def open(cls, path: str | Path, *, create: bool = True, read_only: bool = False) -> AuditLog:
        """Open the log in folder ``path``, creating folder and database when ``create`` is true.

        Args:
            path: the log's folder (not the ``audit.sqlite`` file).
            create: create the log if it does not exist; otherwise a missing log is an error.
            read_only: open without write access (for verifying and reading); implies ``create=False``.

        Raises:
            ConfigError: the log does not exist (and ``create`` is false), ``path`` is a file, or the
                database is not a fedsilo audit log of a known format.
        """
        folder = Path(path)
        db = folder / DB_NAME
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{folder} is a file, not an audit log folder", fix=MISSING_FIX)
        if not db.is_file():
            if read_only or not create:
                raise ConfigError(f"no audit log at {folder}", fix=MISSING_FIX)
            folder.mkdir(parents=True, exist_ok=True)
        target = f"{db.resolve().as_uri()}?mode=ro" if read_only else str(db)
        conn = sqlite3.connect(target, uri=read_only, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        log = cls(folder, conn, read_only=read_only)
        try:
            log._prepare()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise ConfigError(f"{db} is not a readable audit log ({exc})",
                              fix="restore audit.sqlite from a copy; only fedsilo should write it") from None
        except BaseException:
            conn.close()
            raise
        return log

    def _prepare(self) -> None:
        if self.read_only:
            self._check_format(self._conn.execute("PRAGMA user_version").fetchone()[0])
            return
        self._conn.execute("PRAGMA journal_mode=WAL").fetchone()
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                self._conn.execute(_SCHEMA)
                self._conn.execute(f"PRAGMA user_version={DB_FORMAT}")
            else:
                self._check_format(version)
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def _check_format(self, version: int) -> None:
        if version != DB_FORMAT:
            raise ConfigError(f"{self.path / DB_NAME} has layout version {version}; this fedsilo reads version {DB_FORMAT}",
                              fix="use the fedsilo version that wrote the log")

    # --- writing ---------------------------------------------------------------------

    def append(self, event: str, *, actor: Mapping[str, Any], object: Mapping[str, Any] | None = None,
               run_id: str | None = None, round: int | None = None, outcome: str = "success",
               reason: str | None = None, details: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Append one record and return it; it is durable when this returns (outside :meth:`batch`).

        The record's time is now, or the previous record's time if the clock stepped back, so times
        never decrease along the chain. Arguments are those of :func:`compliance.records.make_record`.

        Raises:
            ConfigError: a field is invalid (the message names it); the log is unchanged.
        """
        if self._tail is not None:
            return self._append(event, actor=actor, object=object, run_id=run_id, round=round, outcome=outcome,
                                reason=reason, details=details)
        with self._transaction():
            return self._append(event, actor=actor, object=object, run_id=run_id, round=round, outcome=outcome,
                                reason=reason, details=details)

    @contextmanager
    def batch(self) -> Iterator[AuditLog]:
        """Append many records in one transaction: all are durable when the block exits, none if it raises.

        Other processes wait (up to ``BUSY_TIMEOUT_S``) while the block runs; keep it short.
        """
        if self._tail is not None:
            raise ConfigError("AuditLog.batch() blocks do not nest")
        with self._transaction():
            yield self

    def _append(self, event: str, **fields: Any) -> dict[str, Any]:
        assert self._tail is not None
        tail = self._tail
        record = make_record(event, seq=tail.next_seq, prev=tail.prev, time=max(utc_now(), tail.time), **fields)
        leaf = canonical_json(record)
        digest = chain_hash(leaf)
        self._conn.execute("INSERT INTO records(seq, leaf, hash) VALUES (?, ?, ?)", (tail.next_seq, leaf, digest))
        self._tail = _Tail(tail.next_seq + 1, digest, record["time"])
        return record

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        if self.read_only:
            raise ConfigError(f"the audit log at {self.path} is open read-only", fix="open it with read_only=False")
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._tail = self._read_tail()
            yield
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        finally:
            self._tail = None

    def _read_tail(self) -> _Tail:
        row = self._conn.execute("SELECT seq, leaf FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        if row is None:
            return _Tail(0, GENESIS_PREV, "")
        seq, leaf = row
        try:
            time = json.loads(leaf)["time"]
            if not isinstance(time, str):
                raise TypeError("time is not a string")
        except (ValueError, KeyError, TypeError) as exc:
            raise VerificationError(f"the last record (seq {seq}) of the audit log at {self.path} is unreadable ({exc})",
                                    fix=f"run 'fedsilo audit verify {self.path}'") from None
        return _Tail(seq + 1, chain_hash(bytes(leaf)), time)

    # --- reading ---------------------------------------------------------------------

    def rows(self, *, tail: int | None = None) -> Iterator[tuple[int, bytes, str]]:
        """The stored rows ``(seq, leaf, hash)`` in seq order, unchecked; the last ``tail`` rows if given."""
        after = -1
        if tail is not None:
            if tail < 1:
                raise ConfigError(f"tail must be at least 1, not {tail}")
            first = self._conn.execute("SELECT seq FROM records ORDER BY seq DESC LIMIT 1 OFFSET ?",
                                       (tail - 1,)).fetchone()
            after = first[0] - 1 if first else -1
        while True:
            page = self._conn.execute("SELECT seq, leaf, hash FROM records WHERE seq > ? ORDER BY seq LIMIT ?",
                                      (after, PAGE_ROWS)).fetchall()
            for seq, leaf, digest in page:
                yield seq, bytes(leaf), digest
            if len(page) < PAGE_ROWS:
                return
            after = page[-1][0]

    def records(self, *, tail: int | None = None) -> Iterator[dict[str, Any]]:
        """The records as dicts in seq order (unverified: use ``verify_log`` to check them)."""
        for _, leaf, _ in self.rows(tail=tail):
            yield json.loads(leaf)

    def __len__(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    def head(self) -> Head | None:
        """The last record's seq and stored hash; None for an empty log."""
        row = self._conn.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        return Head(*row) if row else None

    def export_jsonl(self, out_path: str | Path) -> int:
        """Write the exact leaf bytes, one record per line, to ``out_path``; return the record count.

        Canonical JSON escapes every control character, so a leaf never contains a newline. The file
        is written to a temporary name and renamed, so a reader never sees half an export.
        """
        out = Path(out_path)
        if not out.parent.is_dir():
            raise ConfigError(f"cannot write {out}: folder {out.parent} does not exist", fix="create it first")
        partial = out.with_name(f".{out.name}.partial")
        count = 0
        try:
            with partial.open("wb") as fh:
                for _, leaf, _ in self.rows():
                    fh.write(leaf + b"\n")
                    count += 1
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(partial, out)
        finally:
            partial.unlink(missing_ok=True)
        return count

    # --- lifetime --------------------------------------------------------------------

    def close(self) -> None:
        """Close the database; safe to call twice."""
        self._conn.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
