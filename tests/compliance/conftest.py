"""Shared fixtures: real SQLite audit logs in tmp_path."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from compliance import AuditLog, EventType

COORDINATOR = {"kind": "coordinator", "id": "coordinator", "site": None}


@pytest.fixture
def actor() -> dict:
    return dict(COORDINATOR)


@pytest.fixture
def make_log(tmp_path: Path) -> Callable[[int], Path]:
    """Write a log of ``n`` records (run.started, then round.started rounds 1..n-1) and return its folder."""

    def make(n: int, folder: str = "run/audit") -> Path:
        path = tmp_path / folder
        with AuditLog.open(path) as log:
            for i in range(n):
                if i == 0:
                    log.append(EventType.RUN_STARTED, actor=COORDINATOR, run_id="run-1",
                               object={"type": "plan", "id": "demo", "sha256": "ab" * 32})
                else:
                    log.append(EventType.ROUND_STARTED, actor=COORDINATOR, run_id="run-1", round=i, details={"nodes": 3})
        return path

    return make
