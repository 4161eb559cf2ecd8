"""``fedsilo bench audit``: append rate (batched and not), verification time, Merkle and signing costs.

``run_audit_bench`` returns the benchmark JSON object of DESIGN.md ("Formats"); every figure is the median of
``repeats`` runs. The verification log is written straight into SQLite from record templates (appending a
million records through ``AuditLog.append`` would take minutes); its records are canonical, hash-chained and
checkpointed exactly as the real writer makes them, which the verifier itself checks.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from compliance import merkle
from compliance.audit_log import DB_NAME, AuditLog
from compliance.canonical import canonical_json
from compliance.checkpoint import Checkpoint, Signer, sign_checkpoint
from compliance.records import EventType
from compliance.verify import verify_log
from fedsilo.errors import ConfigError

BATCH = 1000  # records per batch() in the batched append case
CHECKPOINT_EVERY = 1000  # checkpoint interval of the generated logs
UNBATCHED_MAX = 2000  # one fsync each: enough records for a steady rate
_ACTOR = {"kind": "coordinator", "id": "coordinator", "site": None}
_SITES = tuple(f"hospital{i}" for i in range(8))
_SOURCE = "coordinator@bench fedsilo/bench"


def run_audit_bench(*, append_records: int, verify_records: int, repeats: int) -> dict[str, Any]:
    """Measure the audit log; returns ``{"bench": "audit", "params", "machine", "rows"}`` (medians of ``repeats``).

    Rows: batched appends/s (baseline: unbatched appends/s), appends/s with a checkpoint signed every
    ``CHECKPOINT_EVERY`` records, verification seconds for ``verify_records`` records (baseline: the same in one
    process), the Merkle root of that many leaves, and the time to sign one checkpoint.
    """
    for name, value in (("append_records", append_records), ("verify_records", verify_records), ("repeats", repeats)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{name} must be a whole number >= 1, not {value!r}")
    unbatched = min(append_records, UNBATCHED_MAX)
    signer = Signer("bench.fedsilo/log", Ed25519PrivateKey.generate())
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedsilo-bench-audit-") as tmp:
        root = Path(tmp)
        counter = iter(range(10**9))

        def fresh() -> Path:
            return root / f"log{next(counter)}"

        _time_appends(fresh(), min(append_records, BATCH), batch=BATCH, signer=signer)  # warm up (imports, caches)
        batched = _median(repeats, lambda: append_records / _time_appends(fresh(), append_records, batch=BATCH))
        single = _median(repeats, lambda: unbatched / _time_appends(fresh(), unbatched, batch=1))
        with_cp = _median(repeats, lambda: append_records / _time_appends(fresh(), append_records, batch=BATCH,
                                                                           signer=signer))
        rows.append(_row(f"append, batched ({BATCH} per transaction)", "records/s", batched,
                         "append, unbatched", single))
        rows.append(_row("append, unbatched (one fsync each)", "records/s", single))
        rows.append(_row(f"append, batched, checkpoint every {CHECKPOINT_EVERY}", "records/s", with_cp,
                         f"append, batched ({BATCH} per transaction)", batched))

        log = root / "verify"
        write_synthetic_log(log, verify_records, signer=signer, checkpoint_every=CHECKPOINT_EVERY * 10)
        keys = [signer.verifier]
        parallel = _median(repeats, lambda: _time(lambda: verify_log(log, keys=keys)))
        one = _median(repeats, lambda: _time(lambda: verify_log(log, keys=keys, workers=1)))
        rows.append(_row(f"verify {verify_records} records", "seconds", parallel,
                         f"verify {verify_records} records, one process", one))
        rows.append(_row(f"verify {verify_records} records, one process", "seconds", one))
        rows.append(_row(f"verify {verify_records} records", "records/s", verify_records / parallel))

        hashes = [merkle.leaf_hash(i.to_bytes(8, "big")) for i in range(verify_records)]
        rows.append(_row(f"merkle root of {verify_records} leaf hashes", "seconds",
                         _median(repeats, lambda: _time(lambda: merkle.root(hashes)))))
        body = Checkpoint("bench.fedsilo/log", verify_records, merkle.EMPTY_ROOT)
        rows.append(_row("sign one checkpoint (Ed25519)", "milliseconds",
                         _median(repeats, lambda: 1000 * _time(lambda: sign_checkpoint(body, signer)))))
    return {
        "bench": "audit",
        "params": {"append_records": append_records, "verify_records": verify_records, "repeats": repeats,
                   "batch": BATCH, "unbatched_records": unbatched, "checkpoint_every": CHECKPOINT_EVERY},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
                    "platform": platform.platform()},
        "rows": rows,
    }


def _row(case: str, metric: str, value: float, baseline: str | None = None,
         baseline_value: float | None = None) -> dict[str, Any]:
    ratio = round(value / baseline_value, 3) if baseline is not None and baseline_value else None
    return {"case": case, "metric": metric, "value": round(value, 4), "baseline": baseline, "ratio": ratio}


def _median(repeats: int, measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(repeats))


def _time(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _time_appends(path: Path, n: int, *, batch: int, signer: Signer | None = None) -> float:
    """Seconds to append ``n`` coordinator-like records through AuditLog, ``batch`` per transaction."""
    every = CHECKPOINT_EVERY if signer is not None else None
    with AuditLog.open(path, signer=signer, checkpoint_every=every) as log:
        start = time.perf_counter()
        for first in range(0, n, batch):
            if batch == 1:
                _append_one(log, first)
                continue
            with log.batch():
                for i in range(first, min(n, first + batch)):
                    _append_one(log, i)
        return time.perf_counter() - start


def _append_one(log: AuditLog, i: int) -> None:
    site = _SITES[i % len(_SITES)]
    log.append(EventType.UPDATE_RECEIVED, actor=_ACTOR, object={"type": "update", "id": f"{site}/{1 + i // 100}",
                                                               "sha256": f"{i:064x}"},
               run_id="bench", round=1 + i // 100,
               details={"site": site, "node": str(i % 97), "bytes": 4_000_000 + i, "l2_norm": 0.5 + (i % 1000) / 1e4})


def write_synthetic_log(path: str | Path, n: int, *, signer: Signer, checkpoint_every: int) -> None:
    """Write a valid log of ``n`` records straight into SQLite, with a checkpoint every ``checkpoint_every``.

    Records mix the coordinator's kinds: flat details with floats (most), and one in 50 with a nested list,
    which takes the verifier's full path. The first 1000 leaves are checked against ``canonical_json``.
    """
    path = Path(path)
    with AuditLog.open(path) as log:
        origin = log.origin
    assert origin is not None
    sha256 = hashlib.sha256
    tree = merkle.CompactRange()
    prev = "0" * 64
    base = 1_767_225_600  # 2026-01-01T00:00:00Z
    seconds: dict[int, str] = {}
    conn = sqlite3.connect(path / DB_NAME, isolation_level=None)
    try:
        conn.execute("PRAGMA synchronous=OFF")  # a throwaway file; durability is not what is measured here
        conn.execute("BEGIN")
        rows: list[tuple[int, bytes, str]] = []
        for i in range(n):
            us = i * 37
            second = base + us // 1_000_000
            prefix = seconds.get(second)
            if prefix is None:
                prefix = seconds[second] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            stamp = f"{prefix}.{us % 1_000_000:06d}Z"
            leaf = _synthetic_leaf(i, prev, stamp)
            if i < 1000:
                assert canonical_json(json.loads(leaf)) == leaf, leaf
            prev = sha256(leaf).hexdigest()
            rows.append((i, leaf, prev))
            tree.append(sha256(b"\x00" + leaf).digest())
            if tree.size % checkpoint_every == 0 or i == n - 1:
                note = sign_checkpoint(Checkpoint(origin, tree.size, tree.root()), signer)
                conn.execute("INSERT INTO checkpoints(size, root, note) VALUES (?, ?, ?)",
                             (tree.size, tree.root(), note))
            if len(rows) >= 10_000:
                conn.executemany("INSERT INTO records(seq, leaf, hash) VALUES (?, ?, ?)", rows)
                rows.clear()
        conn.executemany("INSERT INTO records(seq, leaf, hash) VALUES (?, ?, ?)", rows)
        conn.execute("COMMIT")
    finally:
        conn.close()


def _synthetic_leaf(i: int, prev: str, stamp: str) -> bytes:
    site = _SITES[i % len(_SITES)]
    round_ = 1 + i // 100
    if i % 50 == 7:  # aggregate.computed with a list: the verifier's full path
        details = f'{{"inputs":["{i:064x}","{i + 1:064x}"],"rule":"fedavg","server_lr":0.1}}'
        event, obj = "aggregate.computed", f'{{"id":"round-{round_}","sha256":"{i:064x}","type":"model"}}'
    elif i % 10 == 0:
        details, event, obj = f'{{"nodes":{3 + i % 5}}}', "round.started", "null"
    else:
        norm = repr(0.5 + (i % 1000) / 1e4)
        details = f'{{"bytes":{4_000_000 + i},"l2_norm":{norm},"node":"{i % 97}","site":"{site}"}}'
        event, obj = "update.received", f'{{"id":"{site}/{round_}","sha256":"{i:064x}","type":"update"}}'
    return (f'{{"actor":{{"id":"coordinator","key":null,"kind":"coordinator","role":"coordinator","site":null}},"details":{details},'
            f'"event":"{event}","event_id":"{i:032x}","object":{obj},"outcome":"success","prev":"{prev}",'
            f'"reason":null,"round":{round_},"run_id":"bench","schema":2,"seq":{i},"source":"{_SOURCE}","time":"{stamp}"}}').encode()
