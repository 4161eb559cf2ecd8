"""A witness: a silo that cosigns the coordinator's checkpoints only if they extend the ones it cosigned before.

Each silo keeps, in its own audit folder, every checkpoint it cosigned (``witness.sqlite``, WAL,
``synchronous=FULL``). For a new checkpoint of a log (an origin) it checks, in one transaction:

  1. the note is a checkpoint signed by a trusted log key (``log_keys``);
  2. against the last checkpoint it holds for that origin (none: the empty tree):
     - a smaller size is refused (an old checkpoint replayed, or the log cut back);
     - the same size with another root is refused (a fork);
     - the same size and root is a retry: the stored cosigned note is returned, nothing is signed again;
     - a larger size needs a valid RFC 9162 consistency proof from the held checkpoint to the new one;
  3. it adds its tlog-cosignature/v1 (an Ed25519 key of type 0x04) and stores the received and cosigned notes.

Once a silo holds a checkpoint, the coordinator cannot rewrite or shorten the log before that point without
every silo's copy showing it: ``fedsilo audit verify LOG --witness SITE_AUDIT_DIR`` compares them.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from compliance import merkle
from compliance.checkpoint import (
    KEY_TYPE_COSIGNATURE,
    KEY_TYPE_NOTE,
    Signer,
    VerifierKey,
    cosign_checkpoint,
    verify_checkpoint,
)
from compliance.records import format_time
from fedsilo.errors import ConfigError, VerificationError

WITNESS_DB = "witness.sqlite"
WITNESS_FORMAT = 1
BUSY_TIMEOUT_S = 60.0
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS cosigned(origin TEXT NOT NULL, size INTEGER NOT NULL, root BLOB NOT NULL, "
    "note BLOB NOT NULL, cosigned BLOB NOT NULL, time TEXT NOT NULL, PRIMARY KEY(origin, size))",
    "CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)


class WitnessError(VerificationError):
    """The witness refused a checkpoint.

    Attributes:
        origin: the log. size: the refused checkpoint's size. held_size: the size the witness holds (or None).
        expected, calculated: the roots involved, where a root failed to match (bytes or None).
    """

    def __init__(self, reason: str, *, origin: str, size: int, held_size: int | None,
                 expected: bytes | None = None, calculated: bytes | None = None, fix: str | None = None) -> None:
        self.origin = origin
        self.size = size
        self.held_size = held_size
        self.expected = expected
        self.calculated = calculated
        super().__init__(f"witness refuses checkpoint {origin} at size {size}: {reason}", fix=fix)


class WitnessConflictError(WitnessError):
    """The proof was made from another size than the witness holds; resend one from ``held_size``."""


@dataclass(frozen=True)
class WitnessedCheckpoint:
    """One checkpoint a witness cosigned: as received (``note``) and with its cosignature (``cosigned``)."""

    origin: str
    size: int
    root: bytes
    note: bytes
    cosigned: bytes
    time: str


class Witness:
    """Cosigns checkpoints of logs signed by ``log_keys``, keeping its state in ``folder/witness.sqlite``.

    Args:
        folder: the silo's audit folder (created if missing).
        signer: the witness key (role "witness", type 0x04).
        log_keys: the trusted keys of the logs it witnesses (type 0x01): a folder of .vkey files or a list.
    """

    def __init__(self, folder: str | Path, signer: Signer, *,
                 log_keys: str | Path | Iterable[str | Path | VerifierKey]) -> None:
        from compliance.keys import load_verifier_keys

        if not isinstance(signer, Signer) or signer.key_type != KEY_TYPE_COSIGNATURE:
            raise ConfigError("a witness signs with a witness key (type 0x04)",
                              fix="generate one: generate_signer(folder, name, role='witness')")
        keys = tuple(k for k in load_verifier_keys(log_keys) if k.key_type == KEY_TYPE_NOTE)
        if not keys:
            raise ConfigError("no log key (type 0x01) among the witness's trusted keys",
                              fix="pass the coordinator's .vkey as log_keys")
        self.folder = Path(folder)
        self.signer = signer
        self.log_keys = keys
        self.folder.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as conn:
            conn.execute("BEGIN IMMEDIATE")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, WITNESS_FORMAT):
                conn.execute("ROLLBACK")
                raise ConfigError(f"{self.folder / WITNESS_DB} has layout version {version}; this fedsilo reads "
                                  f"version {WITNESS_FORMAT}")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('vkey', ?)", (signer.vkey(),))
            conn.execute(f"PRAGMA user_version={WITNESS_FORMAT}")
            conn.execute("COMMIT")

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.folder / WITNESS_DB, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL").fetchone()
        conn.execute("PRAGMA synchronous=FULL")
        return conn

    def cosign(self, note: bytes, consistency_proof: Sequence[bytes], *, old_size: int | None = None) -> bytes:
        """Check a checkpoint against the last one held for its origin, cosign it, store both; return it cosigned.

        Args:
            note: the checkpoint as the log signed it.
            consistency_proof: RFC 9162 proof from the size the witness holds (0 if none) to the new size.
            old_size: the size the proof starts from, if the sender says; a different held size raises
                :class:`WitnessConflictError` (carrying ``held_size``) before any proof is checked.

        Raises:
            NoteError, SignatureError: the note is malformed or not signed by a trusted log key.
            WitnessConflictError: ``old_size`` is not the held size.
            WitnessError: a smaller size (replay, rollback), a fork at the same size, or a consistency proof
                that is malformed or does not lead from the held root to the new one.
        """
        checkpoint = verify_checkpoint(note, self.log_keys).checkpoint  # 1.
        origin, size, root = checkpoint.origin, checkpoint.size, checkpoint.root
        proof = list(consistency_proof)
        with closing(self._connect()) as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                held = _latest(conn, origin)  # 2.
                held_size = held.size if held else 0
                held_root = held.root if held else merkle.EMPTY_ROOT
                if old_size is not None and old_size != held_size:
                    raise WitnessConflictError(f"the proof starts at size {old_size}, but the witness holds size "
                                               f"{held_size}", origin=origin, size=size, held_size=held_size,
                                               fix=f"send a consistency proof from size {held_size}")
                if size < held_size:
                    raise WitnessError(f"it already cosigned size {held_size}; a smaller size is an old checkpoint "
                                       "replayed or a log cut back", origin=origin, size=size, held_size=held_size,
                                       fix="the log must only grow: compare it with this witness's copy")
                if size == held_size and held is not None:
                    if root != held.root:
                        raise WitnessError("it holds another root for this size: the log forked", origin=origin,
                                           size=size, held_size=held_size, expected=held.root, calculated=root,
                                           fix="the coordinator presented two different logs; investigate")
                    if proof:
                        raise WitnessError("a checkpoint it holds needs an empty proof", origin=origin, size=size,
                                           held_size=held_size)
                    conn.execute("COMMIT")
                    return held.cosigned  # a retry: the same statement as before
                try:
                    merkle.verify_consistency(held_size, size, held_root, root, proof)
                except merkle.RootMismatchError as exc:
                    raise WitnessError(f"the consistency proof from size {held_size} does not hold ({exc.which} "
                                       "mismatch): the new tree does not extend the one it cosigned", origin=origin,
                                       size=size, held_size=held_size, expected=exc.expected,
                                       calculated=exc.calculated) from None
                except merkle.ProofShapeError as exc:
                    raise WitnessError(f"malformed consistency proof from size {held_size}: {exc.message}",
                                       origin=origin, size=size, held_size=held_size) from None
                cosigned = cosign_checkpoint(note, self.signer)  # 3.
                conn.execute("INSERT INTO cosigned(origin, size, root, note, cosigned, time) VALUES (?, ?, ?, ?, ?, ?)",
                             (origin, size, root, bytes(note), cosigned, _now()))
                conn.execute("COMMIT")
                return cosigned
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def latest(self, origin: str) -> WitnessedCheckpoint | None:
        """The largest checkpoint held for ``origin``, or None."""
        with closing(self._connect()) as conn:
            return _latest(conn, origin)

    def checkpoints(self, origin: str) -> list[WitnessedCheckpoint]:
        """Every checkpoint held for ``origin``, by size."""
        return read_witnessed(self.folder, origin)


def _now() -> str:
    return format_time(datetime.now(timezone.utc))


def _rows(conn: sqlite3.Connection, origin: str, *, latest: bool) -> list[WitnessedCheckpoint]:
    sql = "SELECT origin, size, root, note, cosigned, time FROM cosigned WHERE origin = ? ORDER BY size"
    if latest:
        sql += " DESC LIMIT 1"
    return [WitnessedCheckpoint(o, s, bytes(r), bytes(n), bytes(c), t) for o, s, r, n, c, t in
            conn.execute(sql, (origin,))]


def _latest(conn: sqlite3.Connection, origin: str) -> WitnessedCheckpoint | None:
    rows = _rows(conn, origin, latest=True)
    return rows[0] if rows else None


def _open_read_only(folder: Path) -> sqlite3.Connection:
    db = Path(folder) / WITNESS_DB
    if not db.is_file():
        raise ConfigError(f"no witness state at {folder} (expected {WITNESS_DB})",
                          fix="pass a silo's audit folder, e.g. runs/demo/sites/hospital0/audit")
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version != WITNESS_FORMAT:
        conn.close()
        raise ConfigError(f"{db} has layout version {version}; this fedsilo reads version {WITNESS_FORMAT}")
    return conn


def read_witnessed(folder: str | Path, origin: str) -> list[WitnessedCheckpoint]:
    """The checkpoints of ``origin`` a witness folder holds, by size (read-only; for verifiers).

    Raises:
        ConfigError: the folder holds no witness state.
    """
    with closing(_open_read_only(Path(folder))) as conn:
        return _rows(conn, origin, latest=False)


def read_witness_vkey(folder: str | Path) -> str | None:
    """The verifier key the witness in ``folder`` cosigns with (public), as it recorded it."""
    with closing(_open_read_only(Path(folder))) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = 'vkey'").fetchone()
    return row[0] if row else None
