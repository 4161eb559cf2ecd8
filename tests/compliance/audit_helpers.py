"""Helpers shared by the compliance tests (a module of its own: conftest.py is not importable by name)."""

from __future__ import annotations

from compliance import AuditLog, EventType

COORDINATOR = {"kind": "coordinator", "id": "coordinator", "site": None}
LOG_KEY = "fedsilo.test/coordinator"
WITNESS_KEYS = ("fedsilo.test/hospital0", "fedsilo.test/hospital1")


def append_rounds(log: AuditLog, start: int, n: int) -> None:
    """Append ``n`` records: run.started at seq 0, then round.started rounds."""
    for i in range(start, start + n):
        if i == 0:
            log.append(EventType.RUN_STARTED, actor=COORDINATOR, run_id="run-1",
                       object={"type": "plan", "id": "demo", "sha256": "ab" * 32})
        else:
            log.append(EventType.ROUND_STARTED, actor=COORDINATOR, run_id="run-1", round=i, details={"nodes": 3})
