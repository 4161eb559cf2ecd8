"""Two processes appending to one log (spawned, each with its own connection) keep one intact chain."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from compliance import AuditLog, EventType, verify_log

PER_WORKER = 60


def _append_many(path: str, site: str) -> None:
    with AuditLog.open(path) as log:
        for i in range(PER_WORKER):
            log.append(EventType.UPDATE_SENT, actor={"kind": "silo", "id": site, "site": site}, round=i + 1,
                       details={"i": i})


def test_two_processes_append_to_one_log(tmp_path: Path) -> None:
    path = tmp_path / "audit"  # created by the workers themselves, racing
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_append_many, args=(str(path), site)) for site in ("hospital0", "hospital1")]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    assert [w.exitcode for w in workers] == [0, 0]

    result = verify_log(path)
    assert result.records == 2 * PER_WORKER
    with AuditLog.open(path, read_only=True) as log:
        by_site: dict[str, list[int]] = {}
        for record in log.records():
            by_site.setdefault(record["actor"]["site"], []).append(record["details"]["i"])
    assert by_site == {"hospital0": list(range(PER_WORKER)), "hospital1": list(range(PER_WORKER))}
    assert result.events == {"update.sent": 2 * PER_WORKER}
