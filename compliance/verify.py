"""Verify an audit log: every record, the Merkle tree over them, its signed checkpoints and witnesses' copies.

Verification raises at the first problem in log order; it never returns a falsy result that a caller could
forget to check. What each layer shows:

- the records (canonical, well-formed, hash-chained): no record was edited, removed or reordered in place;
- the signed checkpoints (RFC 6962 roots over the records, Ed25519 signed by the log's key): the records
  up to each checkpoint are the ones the log's key signed; a rebuilt and re-chained log no longer matches;
- the witnesses' copies (checkpoints each silo cosigned, kept in the silo's own folder): the log was not cut
  back, forked or rewritten after a checkpoint left the coordinator, even by someone holding the log's key.

Records after the last checkpoint are reported as an unanchored tail (``VerifyResult.unanchored``); nothing
but the hash chain protects them yet.

Speed: records are read in pages and checked by a compiled pattern of the canonical record layout (one C-level
match instead of parsing and re-serializing JSON); any record the pattern does not accept takes the full
path (JSON parse, RFC 8785 re-serialization, schema check), which decides. Logs of ``PARALLEL_MIN_RECORDS`` or
more are split into chunks of ``CHUNK_RECORDS`` (a power of two, so the chunks' Merkle subtrees join exactly)
and checked by worker processes.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, NamedTuple

from compliance import merkle
from compliance.audit_log import DB_NAME, AuditLog
from compliance.canonical import parse_canonical
from compliance.checkpoint import NoteError, SignatureError, VerifierKey, parse_checkpoint, parse_note, verify_checkpoint
from compliance.keys import load_verifier_keys
from compliance.records import EVENT_TYPES, FIELDS, GENESIS_PREV, OUTCOMES, check_record
from compliance.witness import WitnessedCheckpoint, read_witness_vkey, read_witnessed
from fedsilo.errors import ConfigError, VerificationError

# Records per chunk: a power of two, so that each chunk's leaves form whole subtrees of the log's tree.
CHUNK_RECORDS = 1 << 16
# Below this many records, one process is faster than starting workers (about 0.3 s each).
PARALLEL_MIN_RECORDS = 150_000
MAX_WORKERS = 8
PAGE_ROWS = 4096

_HEX64 = re.compile(r"[0-9a-f]{64}")


class AuditVerificationError(VerificationError):
    """The audit log is not intact at record ``seq``.

    Attributes:
        seq: the first record that failed (for a checkpoint: the first record it covers that no earlier
            verified checkpoint covers).
        reason: what failed, e.g. "prev hash mismatch".
        expected, got: the value the log requires and the value found (None where not applicable).
        checkpoint: the tree size of the checkpoint that failed, or None for a record.
    """

    checkpoint: int | None = None

    def __init__(self, reason: str, *, seq: int, expected: str | None = None, got: str | None = None) -> None:
        self.seq = seq
        self.reason = reason
        self.expected = expected
        self.got = got
        super().__init__(self._message(), fix=self._fix())

    def _message(self) -> str:
        message = f"audit log broken at seq {self.seq}: {self.reason}"
        if self.expected is not None or self.got is not None:
            message += f" (expected {_short(self.expected)}, found {_short(self.got)})"
        return message

    def _fix(self) -> str:
        return (f"records from seq {self.seq} on cannot be trusted; compare them with an earlier export "
                "(fedsilo audit export)")


class CheckpointVerificationError(AuditVerificationError):
    """A checkpoint of size ``checkpoint`` (stored in the log, or held by a witness) does not hold.

    For a root mismatch ``expected`` is the root the checkpoint signed and ``got`` the root computed from the
    records (hex); otherwise the values the reason names. ``source`` says whose checkpoint: "checkpoint" (stored
    in the log) or "witness <folder>".
    """

    def __init__(self, reason: str, *, size: int, first_seq: int, expected: str | None = None,
                 got: str | None = None, source: str = "checkpoint", computed: bool = False) -> None:
        self.checkpoint = size
        self.source = source
        self._got_label = "computed" if computed else "found"
        super().__init__(reason, seq=first_seq, expected=expected, got=got)

    def _message(self) -> str:
        last = self.checkpoint - 1 if self.checkpoint else 0
        where = f"records {self.seq}..{last}" if self.checkpoint and self.checkpoint > self.seq else f"seq {self.seq}"
        message = f"audit log broken at {self.source} of size {self.checkpoint} ({where}): {self.reason}"
        if self.expected is not None or self.got is not None:
            message += f" (expected {_short(self.expected)}, {self._got_label} {_short(self.got)})"
        return message

    def _fix(self) -> str:
        return (f"records {self.seq}..{max(self.seq, (self.checkpoint or 1) - 1)} are not what was signed; "
                "compare them with a witness's copy or an earlier export")


@dataclass(frozen=True)
class WitnessReport:
    """What one witness folder showed: how many of its checkpoints of this log matched, the largest size."""

    folder: str
    checkpoints: int
    latest: int
    cosignatures_checked: bool


@dataclass(frozen=True)
class VerifyResult:
    """What an intact log holds, and how far it is anchored.

    Attributes:
        records, head, first_time, last_time, events: the records (head: SHA-256 of the last leaf, hex).
        root: the Merkle root (hex) over all records.
        checkpoints: stored checkpoints that matched the tree.
        signatures_checked: their signatures were checked against trusted keys (``keys=`` given).
        anchored: records covered by the largest matching checkpoint (stored or a witness's).
        witnesses: one report per witness folder given.
    """

    records: int
    head: str
    first_time: str
    last_time: str
    events: dict[str, int]
    root: str = ""
    checkpoints: int = 0
    signatures_checked: bool = False
    anchored: int = 0
    witnesses: tuple[WitnessReport, ...] = field(default=())

    @property
    def unanchored(self) -> int:
        """Records after the last matching checkpoint: protected by the hash chain only."""
        return self.records - self.anchored

    @property
    def warnings(self) -> tuple[str, ...]:
        """What the verification could not show, one line each (the CLI prints them)."""
        out = []
        if self.unanchored:
            out.append(f"{self.unanchored} of {self.records} records (seq {self.anchored}..{self.records - 1}) come "
                       "after the last checkpoint: no signature covers them yet")
        if self.checkpoints and not self.signatures_checked:
            out.append(f"the signatures of {self.checkpoints} checkpoints were not checked (pass trusted keys: --keys DIR)")
        for w in self.witnesses:
            if not w.cosignatures_checked:
                out.append(f"the cosignatures of witness {w.folder} were not checked (its key is not among the trusted keys)")
        return tuple(out)


def verify_log(path: str | Path, *, keys: str | Path | Iterable[str | Path | VerifierKey] | None = None,
               witnesses: Sequence[str | Path] = (), workers: int | None = None) -> VerifyResult:
    """Check the log in folder ``path``: every record in seq order, the Merkle tree, each stored checkpoint,
    and each witness's checkpoints of this log; raise at the first problem.

    For each record:
      1. its seq is the next one (0, 1, 2, ...): no record removed;
      2. its stored hash equals SHA-256 of its leaf bytes;
      3. the leaf is canonical JSON (RFC 8785);
      4. the record follows its schema (known schema version, known event type, field types);
      5. the record's ``seq`` field equals the row's seq;
      6. the record's ``prev`` equals the hash of the previous leaf (64 zeros at seq 0);
      7. its time is not before the previous record's time.
    At each stored checkpoint of size S (once records 0..S-1 are checked):
      8. the note parses, is for this log's origin and states size S and the stored root;
      9. with ``keys``: a trusted log key signed it (cosignatures by trusted witness keys must verify too);
      10. its root equals the Merkle root computed over records 0..S-1.
    For each checkpoint a witness folder holds for this log's origin: steps 8-10 likewise (a size beyond the
    log's end means the log was cut back). An empty log fails; so do trusted keys with no checkpoint to check,
    and a witness folder with no checkpoint of this log.

    Args:
        path: the log's folder.
        keys: trusted verifier keys: a folder of ``.vkey`` files or a list of vkey strings/files/keys. Without
            keys, checkpoint roots are still checked but their signatures are not (``signatures_checked``).
        witnesses: silo audit folders holding a witness state (``witness.sqlite``).
        workers: worker processes for the record checks; default: several for logs of
            ``PARALLEL_MIN_RECORDS`` or more, else none (1).

    Raises:
        ConfigError: no audit log at ``path``, bad keys or witness folders.
        AuditVerificationError: a record is not intact (seq, reason, expected and found values).
        CheckpointVerificationError: a checkpoint does not hold (its size, the records it covers, the signed
            and the computed root).
    """
    trusted = load_verifier_keys(keys) if keys is not None else None
    with AuditLog.open(path, read_only=True) as log:
        snapshot = _read_snapshot(log)
    if trusted is not None and not snapshot.checkpoints:
        raise AuditVerificationError("trusted keys were given but the log holds no checkpoint to check them "
                                     "against", seq=0, expected="at least 1 signed checkpoint", got="0")
    held = [_read_witness(Path(folder), snapshot.origin) for folder in witnesses]
    scan = _Verifier(Path(path), snapshot, trusted, held, workers)
    return scan.run()


def _short(value: str | None) -> str:
    """Abbreviate a SHA-256 hex digest to 12 characters for one-line messages."""
    if value is not None and _HEX64.fullmatch(value):
        return value[:12] + "..."
    return str(value)


# --- reading the log ---------------------------------------------------------------------------------------


class _Snapshot(NamedTuple):
    size: int  # max seq + 1
    count: int  # rows
    min_seq: int | None
    origin: str | None
    checkpoints: list[tuple[int, bytes, bytes]]  # (size, root, note)


def _read_snapshot(log: AuditLog) -> _Snapshot:
    """The tree size, origin and checkpoints as of one read transaction (appends may go on meanwhile)."""
    conn = log._conn
    conn.execute("BEGIN")
    try:
        low, high, count = conn.execute("SELECT MIN(seq), MAX(seq), COUNT(*) FROM records").fetchone()
        checkpoints = [(s, bytes(r), bytes(n)) for s, r, n in conn.execute(
            "SELECT size, root, note FROM checkpoints ORDER BY size")] if log._format >= 2 else []
    except sqlite3.DatabaseError as exc:
        raise AuditVerificationError(f"database unreadable ({exc})", seq=0) from None
    finally:
        conn.execute("COMMIT")
    size = 0 if high is None else int(high) + 1
    return _Snapshot(size, int(count), low, log.origin, checkpoints)


class _Held(NamedTuple):
    folder: str
    checkpoints: list[WitnessedCheckpoint]
    vkey: str | None  # the key the witness says it cosigns with


def _read_witness(folder: Path, origin: str | None) -> _Held:
    if origin is None:
        raise ConfigError("this log has layout 1 (no checkpoints), so no witness can hold its checkpoints",
                          fix="verify it without --witness")
    held = read_witnessed(folder, origin)
    if not held:
        raise VerificationError(f"witness {folder} holds no checkpoint of this log (origin {origin})",
                                fix="pass the audit folder of a silo that witnessed this log")
    return _Held(str(folder), held, read_witness_vkey(folder))


# --- one chunk of records ----------------------------------------------------------------------------------

# The canonical layout of a schema-2 record, all-ASCII (anything else takes the full path). Keys in RFC 8785
# order; strings with exactly the JCS escapes; integers without leading zeros, below 10**15 (so within I-JSON's
# 2**53). ``details`` is matched as a flat object of up to _FLAT_MAX simple keys (captured, so their order can be
# checked) and scalar values, or as any brace-delimited text, which takes the full path. Floats must be
# fixed-point without a trailing zero; _fast_fields then checks that ``repr`` writes each one the same way, which
# in the fixed-point range is ECMAScript's way too (both print the shortest round-tripping digits).
_CHAR = rb'[ !#-\[\]-\x7f]'  # printable ASCII and DEL, but not '"' or '\'
_ESCAPE = rb'\\(?:["\\bfnrt]|u00(?:0[0-7bef]|1[0-9a-f]))'
_STRING = rb'"' + _CHAR + rb'*(?:' + _ESCAPE + _CHAR + rb'*)*"'
_TEXT = rb'"(?!")' + _CHAR + rb'*(?:' + _ESCAPE + _CHAR + rb'*)*"'  # a non-empty string
_SMALL_INT = rb'(?:0|[1-9][0-9]{0,14})'
_FLOAT = rb'-?(?:0|[1-9][0-9]{0,20})\.[0-9]{0,20}[1-9]'
_SCALAR = rb'(?:null|true|false|' + _STRING + rb'|' + _FLOAT + rb'|0|-?[1-9][0-9]{0,14})'
_FLAT_MAX = 8
_FLAT = rb'(\{"([A-Za-z0-9_.\-]+)":' + _SCALAR
for _ in range(_FLAT_MAX - 1):
    _FLAT += rb'(?:,"([A-Za-z0-9_.\-]+)":' + _SCALAR
_FLAT += rb')?' * (_FLAT_MAX - 1) + rb'\})'
_EVENTS = b"|".join(re.escape(e.encode()) for e in sorted(EVENT_TYPES))
_OUTCOMES = b"|".join(re.escape(o.encode()) for o in OUTCOMES)
_RECORD_FIELDS = ("actor", "details", "event", "event_id", "object", "outcome", "prev", "reason", "round",
                  "run_id", "schema", "seq", "source", "time")
assert tuple(sorted(FIELDS)) == _RECORD_FIELDS, "the fast record pattern must follow records.FIELDS"
_RECORD = re.compile(
    rb'\{"actor":\{"id":' + _TEXT + rb',"key":(?:null|"[a-z0-9-]{1,16}:[0-9a-f]{64}"),"kind":' + _TEXT
    + rb',"role":' + _TEXT + rb',"site":(?:null|' + _TEXT + rb')\},'
    rb'"details":(?:null|' + _FLAT + rb'|(\{.*?\})),'
    rb'"event":"(' + _EVENTS + rb')",'
    rb'"event_id":"[0-9a-f]{32}",'
    rb'"object":(?:null|\{"id":' + _TEXT + rb',"sha256":(?:null|"[0-9a-f]{64}"),"type":' + _TEXT + rb'\}),'
    rb'"outcome":"(?:' + _OUTCOMES + rb')",'
    rb'"prev":"([0-9a-f]{64})",'
    rb'"reason":(?:null|' + _TEXT + rb'),'
    rb'"round":(?:null|' + _SMALL_INT + rb'),'
    rb'"run_id":(?:null|' + _TEXT + rb'),'
    rb'"schema":2,'
    rb'"seq":(' + _SMALL_INT + rb'),'
    rb'"source":' + _TEXT + rb','
    rb'"time":"(([0-9]{4}-[0-9]{2}-[0-9]{2})T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]\.[0-9]{6}Z)"\}')
_FLOATS = re.compile(rb':(' + _FLOAT + rb')[,}]')  # inside a string too, at worst: then only a slower path
_GENESIS = GENESIS_PREV.encode()


def _fast_fields(m: re.Match[bytes], valid_dates: set[bytes]) -> tuple[bytes, bytes, bytes, bytes] | None:
    """(event, prev, seq text, time) of a record the pattern matched, or None: let the full path decide."""
    groups = m.groups()
    flat = groups[0]
    if flat is not None:
        keys = [k for k in groups[1:_FLAT_MAX + 1] if k is not None]
        # ASCII keys: byte order is RFC 8785's UTF-16 order; strictly increasing, so no duplicates either
        if len(keys) > 1 and keys != sorted(set(keys)):
            return None
        if b"." in flat:
            for token in _FLOATS.findall(flat):
                text = token.decode("ascii")
                if float.__repr__(float(text)) != text:
                    return None
    elif groups[_FLAT_MAX + 1] is not None:  # details not flat
        return None
    event, prev, seq_text, time, day = groups[_FLAT_MAX + 2:]
    if day not in valid_dates:
        try:
            date.fromisoformat(day.decode("ascii"))
        except ValueError:
            return None
        valid_dates.add(day)
    return event, prev, seq_text, time


class _Chunk(NamedTuple):
    """What one worker found in records [start, stop)."""

    start: int
    checked: int  # records start..start+checked-1 passed steps 1-7 (as far as the chunk can tell)
    error: tuple[int, str, str | None, str | None] | None  # (seq, reason, expected, got)
    first_prev: bytes  # the prev field of record ``start`` (checked against the previous chunk)
    first_time: bytes
    last_hash: str
    last_time: bytes
    events: dict[bytes, int]
    tree_size: int
    tree: tuple[bytes, ...]  # compact range of the checked records' leaf hashes
    snapshots: dict[int, tuple[int, tuple[bytes, ...]]]  # absolute size -> (local size, compact range)


def _scan(db_uri: str, start: int, stop: int, sizes: tuple[int, ...]) -> _Chunk:
    """Check records [start, stop) (steps 1-7; 6 and 7 for ``start`` are left to the caller)."""
    conn = sqlite3.connect(db_uri, uri=True)
    try:
        return _scan_rows(conn, start, stop, sizes)
    finally:
        conn.close()


def _scan_rows(conn: sqlite3.Connection, start: int, stop: int, sizes: tuple[int, ...]) -> _Chunk:
    sha256 = hashlib.sha256
    match = _RECORD.fullmatch
    stack: list[bytes] = []  # a merkle.CompactRange of the chunk's leaf hashes, inlined for speed
    count = 0
    wanted = set(sizes)
    snapshots: dict[int, tuple[int, tuple[bytes, ...]]] = {}
    events: Counter[bytes] = Counter()
    valid_dates: set[bytes] = set()
    expected = start
    prev_hash = _GENESIS if start == 0 else b""
    first_prev = first_time = last_time = b""
    error: tuple[int, str, str | None, str | None] | None = None
    cursor = conn.execute("SELECT seq, leaf, hash FROM records WHERE seq >= ? AND seq < ? ORDER BY seq", (start, stop))
    try:
        while error is None:
            page = cursor.fetchmany(PAGE_ROWS)
            if not page:
                break
            for seq, leaf, stored in page:
                # 1. no gap
                if seq != expected:
                    error = (expected, "seq gap, a record was removed", str(expected), str(seq))
                    break
                if type(leaf) is not bytes:
                    error = (seq, f"leaf is stored as {type(leaf).__name__}, not bytes", None, None)
                    break
                # 2. stored hash
                digest = sha256(leaf).hexdigest()
                if stored != digest:
                    error = (seq, "stored hash does not match the leaf", digest, str(stored))
                    break
                # 3.-5. canonical, schema, seq field: the pattern, or the full path
                m = match(leaf)
                fields = _fast_fields(m, valid_dates) if m is not None else None
                if fields is None:
                    fields, problem = _full_check(leaf, seq)
                    if problem is not None:
                        error = problem
                        break
                event, prev, seq_text, time = fields
                if seq_text != str(seq).encode():
                    error = (seq, "seq field does not match the row", str(seq), seq_text.decode())
                    break
                # 6. chain link and 7. time order (for ``start`` unless it is seq 0: the caller's)
                if seq == start and start != 0:
                    first_prev, first_time = prev, time
                else:
                    if prev != prev_hash:
                        error = (seq, "prev hash mismatch", prev_hash.decode(), prev.decode())
                        break
                    if time < last_time:
                        error = (seq, "time goes backwards", f">= {last_time.decode()}", time.decode())
                        break
                    if seq == 0:
                        first_prev, first_time = prev, time
                events[event] += 1
                # the leaf joins the tree (merkle.CompactRange.append)
                stack.append(sha256(b"\x00" + leaf).digest())
                n = count
                count += 1
                while n & 1:
                    right = stack.pop()
                    stack[-1] = sha256(b"\x01" + stack[-1] + right).digest()
                    n >>= 1
                expected = seq + 1
                if expected in wanted:
                    snapshots[expected] = (count, tuple(stack))
                prev_hash, last_time = digest.encode(), time
    except sqlite3.DatabaseError as exc:
        error = (expected, f"database unreadable ({exc})", None, None)
    finally:
        cursor.close()
    if error is None and expected < stop:
        row = conn.execute("SELECT MIN(seq) FROM records WHERE seq >= ?", (expected,)).fetchone()
        error = (expected, "seq gap, a record was removed", str(expected), str(row[0]))
    return _Chunk(start, expected - start, error, first_prev, first_time, prev_hash.decode(), last_time,
                  dict(events), count, tuple(stack), snapshots)


class _WorkerPool:
    """``workers`` processes running :mod:`compliance._verify_worker`; chunk k goes to worker k % workers.

    Results come back in chunk order. Two jobs are queued per worker so none waits for the parent. A worker
    that fails (it cannot start, dies, or sends garbage) is not trusted for anything: its chunks are checked
    again in this process.
    """

    def __init__(self, workers: int) -> None:
        env = dict(os.environ)
        roots = {str(Path(m.__file__).resolve().parent.parent) for m in (sys.modules["compliance"],
                                                                           sys.modules["fedsilo"])}
        env["PYTHONPATH"] = os.pathsep.join([*sorted(roots), *filter(None, [env.get("PYTHONPATH")])])
        if not sys.executable:
            raise OSError("no Python executable to start workers with")
        self.procs: list[subprocess.Popen[bytes]] = []
        try:
            for _ in range(workers):
                self.procs.append(subprocess.Popen([sys.executable, "-m", "compliance._verify_worker"],
                                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env))
        except OSError:
            self.finished = False
            self.__exit__()
            raise
        self.broken: set[int] = set()
        self.finished = False

    def map(self, jobs: list[tuple[str, int, int, tuple[int, ...]]]) -> Iterator[_Chunk]:
        w = len(self.procs)

        def send(k: int) -> None:
            i = k % w
            if k < len(jobs) and i not in self.broken:
                try:
                    pickle.dump(jobs[k], self.procs[i].stdin, protocol=pickle.HIGHEST_PROTOCOL)
                    self.procs[i].stdin.flush()
                except OSError:
                    self.broken.add(i)

        for k in range(2 * w):
            send(k)
        for k, job in enumerate(jobs):
            i = k % w
            chunk = None
            if i not in self.broken:
                try:
                    chunk = pickle.load(self.procs[i].stdout)
                except Exception:  # a dead or confused worker: do its chunks here
                    self.broken.add(i)
                    chunk = None
                if not isinstance(chunk, _Chunk) or chunk.start != job[1]:
                    self.broken.add(i)
                    chunk = None
            if chunk is None:
                chunk = _scan(*job)
            send(k + 2 * w)
            yield chunk
        self.finished = True

    def __enter__(self) -> _WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            if not self.finished:  # stopped early (a broken record): the rest of the work is moot
                proc.kill()  # our own child, by its handle
            try:
                proc.stdin.close()
            except OSError:
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except Exception:
                proc.kill()
                proc.wait()
            proc.stdout.close()


def _full_check(leaf: bytes, seq: int) -> tuple[tuple[bytes, bytes, bytes, bytes] | None, Any]:
    """Steps 3-4 the thorough way; returns ((event, prev, seq text, time), None) or (None, error)."""
    try:
        record: Any = parse_canonical(leaf)
    except ConfigError as exc:
        return None, (seq, f"leaf is {exc.message}", None, None)
    try:
        check_record(record)
    except ConfigError as exc:
        return None, (seq, f"invalid record: {exc.message}", None, None)
    return (record["event"].encode(), record["prev"].encode(), str(record["seq"]).encode(),
            record["time"].encode()), None


# --- putting the chunks together ---------------------------------------------------------------------------


class _Target(NamedTuple):
    size: int
    source: str  # "checkpoint" or "witness <folder>"
    root: bytes  # as stored next to the note
    note: bytes


class _Verifier:
    def __init__(self, path: Path, snapshot: _Snapshot, trusted: Sequence[VerifierKey] | None,
                 held: list[_Held], workers: int | None) -> None:
        self.path = path
        self.snapshot = snapshot
        self.trusted = trusted
        self.held = held
        self.workers = workers
        self.targets: dict[int, list[_Target]] = {}
        for size, root, note in snapshot.checkpoints:
            self.targets.setdefault(size, []).append(_Target(size, "checkpoint", root, note))
        for h in held:
            for w in h.checkpoints:
                self.targets.setdefault(w.size, []).append(_Target(w.size, f"witness {h.folder}", w.root, w.cosigned))
        self.anchored = 0  # largest size whose checkpoint matched so far
        self.matched: Counter[str] = Counter()
        self.latest: dict[str, int] = {}
        # A witness's cosignatures are checked when its key (as it recorded it) is among the trusted keys.
        self.witness_key: dict[str, VerifierKey | None] = {}
        for h in held:
            key = next((k for k in trusted or () if k.vkey() == h.vkey), None)
            self.witness_key[h.folder] = key

    def run(self) -> VerifyResult:
        n, low = self.snapshot.size, self.snapshot.min_seq
        if low is not None and low != 0:
            raise AuditVerificationError("seq gap, a record was removed", seq=0, expected="0", got=str(low))
        if n == 0:
            raise AuditVerificationError("no records", seq=0, expected="at least 1 record", got="0")
        tree = merkle.CompactRange()
        events: Counter[bytes] = Counter()
        head, last_time, first_time = GENESIS_PREV, b"", b""
        # With fewer rows than max seq + 1, a seq in 0..count is missing (pigeonhole): scanning that far finds it,
        # however large a forged seq is.
        for chunk in self._chunks(min(n, self.snapshot.count + 1)):
            # 6./7. for the chunk's first record, against the previous chunk
            if chunk.start and chunk.checked:
                if chunk.first_prev != head.encode():
                    raise AuditVerificationError("prev hash mismatch", seq=chunk.start, expected=head,
                                                 got=chunk.first_prev.decode())
                if chunk.first_time < last_time:
                    raise AuditVerificationError("time goes backwards", seq=chunk.start,
                                                 expected=f">= {last_time.decode()}", got=chunk.first_time.decode())
            if chunk.start == 0:
                first_time = chunk.first_time
            # 8.-10. checkpoints inside the checked part of the chunk, in size order
            for size in sorted(s for s in chunk.snapshots):
                local_size, hashes = chunk.snapshots[size]
                joined = tree.copy()
                joined.extend_aligned(merkle.CompactRange(local_size, hashes))
                self._check_targets(size, joined.root())
            if chunk.error is not None:
                seq, reason, expected, got = chunk.error
                raise AuditVerificationError(reason, seq=seq, expected=expected, got=got)
            tree.extend_aligned(merkle.CompactRange(chunk.tree_size, chunk.tree))
            events.update(chunk.events)
            head, last_time = chunk.last_hash, chunk.last_time
        # checkpoints beyond the last record: the log was cut back below them
        for size in sorted(s for s in self.targets if s > n):
            target = self.targets[size][0]
            raise CheckpointVerificationError(f"the log ends at {n} records, below this checkpoint: records were cut "
                                              "from its end", size=size, first_seq=n, source=target.source)
        if 0 in self.targets:  # a checkpoint of the empty tree: check it as well
            self._check_targets(0, merkle.EMPTY_ROOT)
        witnesses = tuple(WitnessReport(h.folder, self.matched[f"witness {h.folder}"], self.latest.get(h.folder, 0),
                                        self.witness_key[h.folder] is not None) for h in self.held)
        return VerifyResult(records=n, head=head, first_time=first_time.decode(), last_time=last_time.decode(),
                            events={k.decode(): v for k, v in sorted(events.items())}, root=tree.root().hex(),
                            checkpoints=self.matched["checkpoint"], signatures_checked=self.trusted is not None,
                            anchored=self.anchored, witnesses=witnesses)

    def _chunks(self, n: int) -> Iterator[_Chunk]:
        uri = f"{(self.path / DB_NAME).resolve().as_uri()}?mode=ro"
        bounds = [(start, min(n, start + CHUNK_RECORDS)) for start in range(0, n, CHUNK_RECORDS)]
        jobs = [(uri, a, b, tuple(s for s in self.targets if a < s <= b)) for a, b in bounds]
        workers = self.workers
        if workers is None:
            workers = min(os.cpu_count() or 1, MAX_WORKERS) if n >= PARALLEL_MIN_RECORDS else 1
        workers = max(1, min(workers, len(jobs)))
        pool = None
        if workers > 1:
            try:
                pool = _WorkerPool(workers)
            except OSError:  # no interpreter to start (embedded Python, say): check here instead
                pool = None
        if pool is None:
            for job in jobs:
                yield _scan(*job)
            return
        with pool:
            yield from pool.map(jobs)

    def _check_targets(self, size: int, computed: bytes) -> None:
        first_seq = self.anchored if self.anchored < size else 0
        for target in self.targets.get(size, ()):
            self._check_one(target, computed, first_seq)
            self.matched[target.source] += 1
            if target.source.startswith("witness "):
                folder = target.source[len("witness "):]
                self.latest[folder] = max(self.latest.get(folder, 0), size)
        if self.targets.get(size):
            self.anchored = max(self.anchored, size)

    def _check_one(self, target: _Target, computed: bytes, first_seq: int) -> None:
        def fail(reason: str, expected: str | None = None, got: str | None = None,
                 computed: bool = False) -> CheckpointVerificationError:
            return CheckpointVerificationError(reason, size=target.size, first_seq=first_seq, expected=expected,
                                               got=got, source=target.source, computed=computed)

        origin = self.snapshot.origin
        # 8. syntax
        try:
            note = parse_note(target.note)
            checkpoint = parse_checkpoint(note.text)
        except NoteError as exc:
            raise fail(f"malformed note: {exc.message}") from None
        # 9. signatures (before the content: a note nobody trusted signed is reported as such)
        if self.trusted is not None:
            try:
                verified = verify_checkpoint(target.note, self.trusted)
            except (NoteError, SignatureError) as exc:
                raise fail(exc.message) from None
            key = self.witness_key.get(target.source[len("witness "):]) if target.source.startswith("witness ") else None
            if key is not None and key not in {c.key for c in verified.cosignatures}:
                raise fail(f"the witness's note lacks its cosignature by {key.name}+{key.key_id.hex()}")
        # 8. origin, size and stored root
        if checkpoint.origin != origin:
            raise fail("the note is for another log", expected=origin, got=checkpoint.origin)
        if checkpoint.size != target.size:
            raise fail("the note states another size", expected=str(target.size), got=str(checkpoint.size))
        if checkpoint.root != target.root:
            raise fail("the stored root differs from the signed one", expected=checkpoint.root.hex(),
                       got=target.root.hex())
        # 10. root
        if computed != checkpoint.root:
            raise fail("root mismatch: the records are not the ones signed", expected=checkpoint.root.hex(),
                       got=computed.hex(), computed=True)
