"""An append-only audit log in SQLite: canonical records (RFC 8785), a Merkle tree over them (RFC 6962) and
signed checkpoints of that tree (C2SP tlog-checkpoint).

The log is a folder (e.g. ``runs/demo/audit/``) holding ``audit.sqlite`` with three tables::

    records(seq INTEGER PRIMARY KEY, leaf BLOB NOT NULL, hash TEXT NOT NULL)
    checkpoints(size INTEGER PRIMARY KEY, root BLOB NOT NULL, note BLOB NOT NULL)
    meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)          -- 'origin': the log's name in checkpoints

``leaf`` is the exact canonical bytes of a record and ``hash`` is SHA-256 of ``leaf`` in hex. Leaf ``seq`` is
leaf ``seq`` of the Merkle tree: leaf hash SHA-256(0x00 || leaf). A checkpoint row holds the tree size, its root
and the signed note (the C2SP checkpoint body plus Ed25519 signature lines, later also witness cosignatures).

Records keep their ``prev`` field (the SHA-256 of the previous leaf). The Merkle tree does not need it, and a
signed checkpoint subsumes it for the records it covers; it is kept because (1) it costs one hash per record,
(2) it pins every record to its predecessor at once, before any checkpoint exists, so an edit in the
unanchored tail is still caught at its exact seq, and (3) record schema 1 and existing logs carry it.

The database runs in WAL mode with ``synchronous=FULL``, so a record (and a checkpoint signed with it) is on
disk when ``append`` returns. Several processes may append to the same log: each append reads the tail inside a
``BEGIN IMMEDIATE`` transaction, which SQLite serializes.
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from compliance import merkle
from compliance.canonical import canonical_json
from compliance.checkpoint import KEY_TYPE_NOTE, Checkpoint, Signer, parse_checkpoint, parse_note
from compliance.checkpoint import sign_checkpoint as sign_checkpoint_note
from compliance.records import GENESIS_PREV, chain_hash, default_source, make_record, utc_now
from fedsilo.errors import ConfigError, VerificationError

DB_NAME = "audit.sqlite"
# PRAGMA user_version of the database layout: 1 = records only; 2 = records, checkpoints, meta.
# A writable open upgrades layout 1 in place (it only adds tables); a read-only open reads both.
DB_FORMAT = 2
READABLE_FORMATS = (1, 2)
ORIGIN_PREFIX = "fedsilo-audit/"
# How long an append waits for another process's transaction before giving up.
BUSY_TIMEOUT_S = 60.0
# Rows read per query; keeps memory flat on long logs without holding a read cursor open.
PAGE_ROWS = 1000
MISSING_FIX = "pass the run's audit/ folder, e.g. runs/demo/audit"

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS records(seq INTEGER PRIMARY KEY, leaf BLOB NOT NULL, hash TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS checkpoints(size INTEGER PRIMARY KEY, root BLOB NOT NULL, note BLOB NOT NULL)",
    "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)


class Head(NamedTuple):
    """The last record of a log: its seq and its chain hash."""

    seq: int
    hash: str


class StoredCheckpoint(NamedTuple):
    """A checkpoint row: tree size, root hash (32 bytes) and the signed note."""

    size: int
    root: bytes
    note: bytes


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
        self._format = DB_FORMAT
        self._origin: str | None = None
        self._signer: Signer | None = None
        self._every: int | None = None
        # Leaf hashes of records [0, size) as a compact range; built on the first checkpoint, then kept up to
        # date by appends. Records are append-only, so a stale range is a prefix and only needs extending.
        self._tree: merkle.CompactRange | None = None

    @classmethod
    def open(cls, path: str | Path, *, create: bool = True, read_only: bool = False, origin: str | None = None,
             signer: Signer | None = None, checkpoint_every: int | None = None, source: str | None = None) -> AuditLog:
        """Open the log in folder ``path``, creating folder and database when ``create`` is true.

        Args:
            path: the log's folder (not the ``audit.sqlite`` file).
            create: create the log if it does not exist; otherwise a missing log is an error.
            read_only: open without write access (for verifying and reading); implies ``create=False``.
            origin: the log's name in its checkpoints (a schema-less URL, no spaces or '+'), fixed when the log
                is created; default ``fedsilo-audit/<random id>``. Witnesses keep one history per origin, so two
                logs must never share one. Passing a different origin for an existing log is an error.
            signer: the log's checkpoint key (role "log"); the default for :meth:`sign_checkpoint`.
            checkpoint_every: with ``signer``, sign a checkpoint whenever the log reaches a multiple of this
                many records, in the same transaction as the record that reaches it.
            source: the component writing (e.g. "coordinator"); records carry ``<source>@<host> fedsilo/<version>``.

        Raises:
            ConfigError: the log does not exist (and ``create`` is false), ``path`` is a file, the database is
                not a fedsilo audit log of a known format, or the origin/signer arguments are invalid.
        """
        if checkpoint_every is not None:
            if signer is None:
                raise ConfigError("checkpoint_every needs a signer", fix="pass signer=load_signer(...)")
            if not isinstance(checkpoint_every, int) or isinstance(checkpoint_every, bool) or checkpoint_every < 1:
                raise ConfigError(f"checkpoint_every must be a whole number >= 1, not {checkpoint_every!r}")
        if signer is not None:
            _check_log_signer(signer)
            if read_only:
                raise ConfigError("a read-only log cannot sign checkpoints", fix="open it with read_only=False")
        if origin is not None:
            Checkpoint(origin, 0, merkle.EMPTY_ROOT)  # checks the origin's syntax
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
        log._signer, log._every = signer, checkpoint_every
        log._source = default_source(source or "fedsilo")
        try:
            log._prepare(origin)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise ConfigError(f"{db} is not a readable audit log ({exc})",
                              fix="restore audit.sqlite from a copy; only fedsilo should write it") from None
        except BaseException:
            conn.close()
            raise
        return log

    def _prepare(self, origin: str | None) -> None:
        if self.read_only:
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            self._check_format(version)
            self._format = version
            if version >= 2:
                self._origin = self._read_origin()
            self._check_origin(origin)
            return
        self._conn.execute("PRAGMA journal_mode=WAL").fetchone()
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            if version != 0:
                self._check_format(version)
            if version < DB_FORMAT:  # a new log, or layout 1: add what is missing
                for statement in _SCHEMA:
                    self._conn.execute(statement)
                self._conn.execute("INSERT OR IGNORE INTO meta(key, value) VALUES ('origin', ?)",
                                   (origin or ORIGIN_PREFIX + uuid.uuid4().hex,))
                self._conn.execute(f"PRAGMA user_version={DB_FORMAT}")
            self._origin = self._read_origin()
            self._check_origin(origin)
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def _check_format(self, version: int) -> None:
        if version not in READABLE_FORMATS:
            raise ConfigError(f"{self.path / DB_NAME} has layout version {version}; this fedsilo reads versions "
                              f"{', '.join(map(str, READABLE_FORMATS))}", fix="use the fedsilo version that wrote the log")

    def _read_origin(self) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'origin'").fetchone()
        return row[0] if row else None

    def _check_origin(self, origin: str | None) -> None:
        if origin is not None and origin != self._origin:
            raise ConfigError(f"the audit log at {self.path} has origin {self._origin!r}, not {origin!r}",
                              fix="pass the log's own origin, or none")

    @property
    def origin(self) -> str | None:
        """The log's name in its checkpoints (None for a layout-1 log opened read-only)."""
        return self._origin

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
        seq = tail.next_seq
        record = make_record(event, seq=seq, prev=tail.prev, time=max(utc_now(), tail.time), source=self._source, **fields)
        leaf = canonical_json(record)
        digest = chain_hash(leaf)
        self._conn.execute("INSERT INTO records(seq, leaf, hash) VALUES (?, ?, ?)", (seq, leaf, digest))
        self._tail = _Tail(seq + 1, digest, record["time"])
        if self._tree is not None and self._tree.size == seq:
            self._tree.append(merkle.leaf_hash(leaf))
        if self._every is not None and (seq + 1) % self._every == 0:
            assert self._signer is not None
            self._checkpoint_locked(self._signer)
        return record

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        if self.read_only:
            raise ConfigError(f"the audit log at {self.path} is open read-only", fix="open it with read_only=False")
        self._conn.execute("BEGIN IMMEDIATE")
        tree = self._tree.copy() if self._tree is not None else None
        try:
            self._tail = self._read_tail()
            yield
            self._conn.execute("COMMIT")
        except BaseException:
            self._tree = tree  # the leaves it may have taken in were rolled back
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise
        finally:
            self._tail = None

    # --- checkpoints -----------------------------------------------------------------

    def sign_checkpoint(self, signer: Signer | None = None) -> bytes:
        """Sign a checkpoint of the whole log as it stands (size = number of records) and store it.

        Returns the signed note (C2SP checkpoint). Signing the same size again returns the stored note. Before
        signing, the tree is checked against every stored checkpoint it passes, so a log edited behind the
        writer's back is refused rather than signed.

        Raises:
            ConfigError: no signer (here or at open), a witness key, a read-only or an empty log.
            VerificationError: the stored records no longer match an earlier checkpoint.
        """
        signer = signer if signer is not None else self._signer
        if signer is None:
            raise ConfigError("sign_checkpoint needs a signer", fix="pass one, or open the log with signer=...")
        _check_log_signer(signer)
        if self._tail is not None:  # inside batch(): part of its transaction
            return self._checkpoint_locked(signer)
        with self._transaction():
            return self._checkpoint_locked(signer)

    def _checkpoint_locked(self, signer: Signer) -> bytes:
        assert self._tail is not None
        size = self._tail.next_seq
        if size == 0:
            raise ConfigError(f"the audit log at {self.path} has no records to checkpoint")
        if self._origin is None:  # unreachable: writable logs have layout 2
            raise ConfigError(f"the audit log at {self.path} has no origin")
        root = self._root_locked(size)
        row = self._conn.execute("SELECT root, note FROM checkpoints WHERE size = ?", (size,)).fetchone()
        if row is not None:
            if bytes(row[0]) != root:
                raise VerificationError(f"the audit log at {self.path} holds a checkpoint of size {size} with root "
                                        f"{bytes(row[0]).hex()[:16]}..., but its records hash to {root.hex()[:16]}...",
                                        fix=f"run 'fedsilo audit verify {self.path}'")
            return bytes(row[1])
        note = sign_checkpoint_note(Checkpoint(self._origin, size, root), signer)
        self._conn.execute("INSERT INTO checkpoints(size, root, note) VALUES (?, ?, ?)", (size, root, note))
        return note

    def _root_locked(self, size: int) -> bytes:
        tree = self._tree
        if tree is None or tree.size > size:
            tree = merkle.CompactRange()
        self._extend_checked(tree, size)
        self._tree = tree
        return tree.root()

    def _extend_checked(self, tree: merkle.CompactRange, size: int) -> None:
        """Extend ``tree`` with the stored leaves up to ``size``, checking stored checkpoints on the way."""
        start = tree.size
        stored = dict(self._conn.execute("SELECT size, root FROM checkpoints WHERE size > ? AND size <= ? "
                                         "ORDER BY size", (start, size)).fetchall())
        for seq, leaf in self._leaves(start, size):
            if seq != tree.size:
                raise VerificationError(f"the audit log at {self.path} has no record {tree.size}",
                                        fix=f"run 'fedsilo audit verify {self.path}'")
            tree.append(merkle.leaf_hash(leaf))
            expected = stored.get(tree.size)
            if expected is not None and bytes(expected) != tree.root():
                raise VerificationError(f"the records of the audit log at {self.path} no longer match its checkpoint "
                                        f"of size {tree.size}; refusing to sign", fix=f"run 'fedsilo audit verify {self.path}'")
        if tree.size != size:
            raise VerificationError(f"the audit log at {self.path} has no record {tree.size}",
                                    fix=f"run 'fedsilo audit verify {self.path}'")

    def _leaves(self, start: int, stop: int) -> Iterator[tuple[int, bytes]]:
        after = start - 1
        while after + 1 < stop:
            page = self._conn.execute("SELECT seq, leaf FROM records WHERE seq > ? AND seq < ? ORDER BY seq LIMIT ?",
                                      (after, stop, PAGE_ROWS)).fetchall()
            if not page:
                return
            for seq, leaf in page:
                yield seq, bytes(leaf)
            after = page[-1][0]

    def store_cosigned(self, note: bytes) -> None:
        """Keep the witness cosignatures of a checkpoint: merge the signature lines of ``note`` into the stored
        note of the same checkpoint (same body, byte for byte). The caller checks the cosignatures
        (``verify_checkpoint``); this only refuses a note whose body is not a stored checkpoint.

        Raises:
            ConfigError: no stored checkpoint has this body.
        """
        parsed = parse_note(note)
        checkpoint = parse_checkpoint(parsed.text)
        with self._transaction():
            row = self._conn.execute("SELECT note FROM checkpoints WHERE size = ?", (checkpoint.size,)).fetchone()
            if row is None or parse_note(bytes(row[0])).text != parsed.text:
                raise ConfigError(f"the audit log at {self.path} holds no checkpoint with this body "
                                  f"(size {checkpoint.size})", fix="pass a note this log signed")
            stored = parse_note(bytes(row[0]))
            known = {(s.name, s.key_id) for s in stored.signatures}
            merged = stored.to_bytes()
            for sig in parsed.signatures:
                if (sig.name, sig.key_id) not in known:
                    merged = merged + sig.line()
            parse_note(merged)  # still within the limits
            self._conn.execute("UPDATE checkpoints SET note = ? WHERE size = ?", (merged, checkpoint.size))

    def checkpoints(self) -> list[StoredCheckpoint]:
        """The stored checkpoints in size order (unverified: use ``verify_log`` to check them)."""
        if self._format < 2:
            return []
        return [StoredCheckpoint(size, bytes(root), bytes(note)) for size, root, note in
                self._conn.execute("SELECT size, root, note FROM checkpoints ORDER BY size")]

    def latest_checkpoint(self) -> StoredCheckpoint | None:
        """The stored checkpoint of the largest size, or None."""
        found = self.checkpoints()
        return found[-1] if found else None

    # --- Merkle tree -----------------------------------------------------------------

    def size(self) -> int:
        """The tree size: the number of records (max seq + 1)."""
        row = self._conn.execute("SELECT MAX(seq) FROM records").fetchone()
        return 0 if row[0] is None else int(row[0]) + 1

    def _size_arg(self, size: int | None) -> int:
        total = self.size()
        if size is None:
            return total
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= total:
            raise ConfigError(f"tree size {size!r} is not between 0 and the log's {total} records")
        return size

    def leaf_hashes(self, size: int | None = None) -> list[bytes]:
        """The Merkle leaf hashes of records [0, size) (default: all), read from the stored leaves."""
        size = self._size_arg(size)
        hashes = [merkle.leaf_hash(leaf) for _, leaf in self._leaves(0, size)]
        if len(hashes) != size:
            raise VerificationError(f"the audit log at {self.path} has no record {len(hashes)}",
                                    fix=f"run 'fedsilo audit verify {self.path}'")
        return hashes

    def root(self, size: int | None = None) -> bytes:
        """The Merkle root of records [0, size) (default: all)."""
        return merkle.root(self.leaf_hashes(size))

    def inclusion_proof(self, seq: int, size: int | None = None) -> list[bytes]:
        """RFC 6962 inclusion proof of record ``seq`` in the tree of ``size`` records (default: all)."""
        return merkle.inclusion_proof(seq, self.leaf_hashes(size))

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """RFC 6962 consistency proof from the tree of ``old_size`` records to ``new_size`` (default: all).

        This is what a witness needs with a new checkpoint: from the size it last cosigned to the new one.
        """
        new_size = self._size_arg(new_size)
        return merkle.consistency_proof(old_size, new_size, self.leaf_hashes(new_size))

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
                # A leaf stored as TEXT was written by something other than fedsilo; show it anyway
                # (the verifier reports it), as its UTF-8 bytes.
                yield seq, leaf.encode("utf-8") if isinstance(leaf, str) else bytes(leaf), digest
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


def _check_log_signer(signer: Signer) -> None:
    if not isinstance(signer, Signer):
        raise ConfigError(f"signer must be a compliance.checkpoint.Signer, not {type(signer).__name__}",
                          fix="load one with compliance.keys.load_signer")
    if signer.key_type != KEY_TYPE_NOTE:
        raise ConfigError(f"key {signer.name} is a witness key (type 0x{signer.key_type:02x}); a log signs with a "
                          "type 0x01 key", fix="generate a log key: generate_signer(folder, name, role='log')")
