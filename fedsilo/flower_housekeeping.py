"""The SuperLink's task-token sweep, run at most once per :data:`SWEEP_EVERY_S` instead of before every request.

Flower 1.42's SQL state sweeps expired task tokens (``SqlCoreState._cleanup_expired_task_tokens``: two bulk
UPDATEs over the task table) at the start of every run-status check, and every Fleet and runtime request that
moves a message makes one (``check_abort``), as do the log stream (every 0.5 s) and the SuperLink's launcher
(every second). Traced in ``fedsilo bench round`` (3 silos, demo model), the sweep was 6 to 20 ms of each 20 to
50 ms object push, object pull and confirmation at a round's change-over, about 20 of them in sequence, and 16%
of the SuperLink's CPU in a py-spy profile; yet a token only expires after a task has missed its heartbeats for
tens of seconds (``HEARTBEAT_DEFAULT_INTERVAL`` 30 s; ``HEARTBEAT_PATIENCE`` of them for a running task), so
sweeping twenty times in half a second finds nothing the first sweep did not.

Here a sweep that comes within :data:`SWEEP_EVERY_S` of the last one (or while one is running) is skipped: a
task whose token has just expired is seen as expired up to that much later. Every path stays consistent without
the sweep: a heartbeat for an expired token is refused by its own ``active_until`` check, and a claim that
expired while starting is returned to pending by the next sweep. Flower has no setting for this; :func:`install`
wraps the method on Flower's class, in the SuperLink process only (``python -m fedsilo.flower_tuning
flower-superlink``).
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any, Callable

#: Least time between two sweeps of expired task tokens, in seconds (Flower: none, one per status check).
SWEEP_EVERY_S = 1.0


def at_most_every(sweep: Callable[[Any], None], interval_s: float, *, clock: Callable[[], float] = time.monotonic) -> Callable[[Any], None]:
    """``sweep`` (a method), run for an instance only if ``interval_s`` has passed since its last run there began,
    and never twice at once; a skipped call returns None at once. The first call always runs."""
    lock = threading.Lock()
    last: dict[int, float] = {}  # id(instance) -> when its last sweep began (a SuperLink has one state instance)

    @functools.wraps(sweep)
    def swept(self: Any) -> None:
        if not lock.acquire(blocking=False):
            return None  # one is running now: it sweeps what this one would
        try:
            started = clock()
            if id(self) in last and started - last[id(self)] < interval_s:
                return None
            last[id(self)] = started
            return sweep(self)
        finally:
            lock.release()

    swept.interval_s = interval_s  # for tests and the start-up line
    return swept


def install(*, interval_s: float = SWEEP_EVERY_S) -> Callable[[Any], None]:
    """Sweep expired task tokens at most once per ``interval_s`` in this process's SQL state; returns the wrapper."""
    from flwr.supercore.corestate.sql_corestate import SqlCoreState

    current = SqlCoreState._cleanup_expired_task_tokens
    if getattr(current, "interval_s", None) is not None:  # installed already
        return current
    SqlCoreState._cleanup_expired_task_tokens = at_most_every(current, interval_s)
    return SqlCoreState._cleanup_expired_task_tokens
