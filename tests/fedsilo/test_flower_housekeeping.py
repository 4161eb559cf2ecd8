"""The SuperLink's expired-token sweep at most once per interval (fedsilo.flower_housekeeping), on Flower's own SQL state."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest

from fedsilo import flower_housekeeping
from fedsilo.flower_housekeeping import at_most_every


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Counting:
    def __init__(self) -> None:
        self.sweeps = 0

    def sweep(self) -> str:
        self.sweeps += 1
        return "swept"


def test_a_sweep_runs_at_most_once_per_interval_per_instance():
    clock = Clock()
    swept = at_most_every(Counting.sweep, 1.0, clock=clock)
    a, b = Counting(), Counting()
    assert swept(a) == "swept" and a.sweeps == 1  # the first call always sweeps
    clock.now += 0.9
    assert swept(a) is None and a.sweeps == 1
    assert swept(b) == "swept" and b.sweeps == 1  # another state instance keeps its own time
    clock.now += 0.1
    assert swept(a) == "swept" and a.sweeps == 2  # counted from when the last sweep began
    assert swept(a) is None and a.sweeps == 2


def test_a_sweep_asked_while_one_runs_is_skipped_not_queued():
    entered, release = threading.Event(), threading.Event()
    calls = []

    def slow(self):
        calls.append(self)
        entered.set()
        release.wait(5)

    swept = at_most_every(slow, 0.0)  # no interval: only the overlap skips
    worker = threading.Thread(target=swept, args=("state",))
    worker.start()
    assert entered.wait(5)
    started = time.monotonic()
    assert swept("state") is None  # returns at once rather than waiting for the running sweep
    assert time.monotonic() - started < 1.0
    release.set()
    worker.join(5)
    assert calls == ["state"]
    swept("state")
    assert calls == ["state", "state"]  # with the first one done, the next sweep runs


@pytest.fixture
def link_state(tmp_path, monkeypatch):
    """Flower's SqlLinkState on a file database with one run, its sweep restored after the test."""
    from flwr.supercore.corestate.sql_corestate import SqlCoreState
    from flwr.superlink.config_loader import get_federation_manager, get_objectstore_linkstate_factories

    monkeypatch.setattr(SqlCoreState, "_cleanup_expired_task_tokens", SqlCoreState._cleanup_expired_task_tokens)
    _, factory = get_objectstore_linkstate_factories(str(tmp_path / "superlink-state.db"), get_federation_manager(is_simulation=False))
    state = factory.state()
    run_id = state.create_run(None, None, None, {}, "default", None, None, "serverapp")
    (task,) = state.get_tasks(run_ids=[run_id])
    return state, run_id, task.task_id


def _expire_claim(state, task_id: int) -> str:
    """Claim the task (as a launcher would) and move the claim's expiry into the past; the claim's token."""
    from flwr.supercore.date import now
    from flwr.supercore.state.schema.corestate_models import Task as TaskModel
    from flwr.supercore.utils import uint64_to_int64
    from sqlalchemy import update

    token = state.claim_task(task_id)
    assert token is not None
    assert state.acknowledge_task_heartbeat(task_id) is True  # a live claim's heartbeat is taken
    with state.session() as session:
        session.execute(update(TaskModel).where(TaskModel.task_id == uint64_to_int64(task_id))
                        .values(active_until=now() - timedelta(seconds=1)))
    return token


def _token(state, task_id: int):
    from flwr.supercore.state.schema.corestate_models import Task as TaskModel
    from flwr.supercore.utils import uint64_to_int64
    from sqlalchemy import select

    with state.session() as session:
        return session.scalar(select(TaskModel.token).where(TaskModel.task_id == uint64_to_int64(task_id)))


def test_flowers_status_checks_sweep_an_expired_claim_once_the_interval_has_passed(link_state):
    state, run_id, task_id = link_state
    swept = flower_housekeeping.install(interval_s=0.3)
    assert flower_housekeeping.install() is swept  # installing twice keeps the first
    state.get_run_status({run_id})  # the first sweep
    _expire_claim(state, task_id)
    state.get_run_status({run_id})  # within the interval: not swept again
    assert _token(state, task_id) is not None
    time.sleep(0.35)
    state.get_run_status({run_id})  # Flower's sweep, through the installed wrapper: the claim returns to pending
    assert _token(state, task_id) is None
    assert state.claim_task(task_id) is not None  # and can be claimed again


def test_a_heartbeat_for_an_expired_claim_not_yet_swept_is_refused(link_state):
    """Skipping a sweep never keeps an expired task alive: Flower's heartbeat checks the expiry itself."""
    state, run_id, task_id = link_state
    flower_housekeeping.install(interval_s=60.0)
    state.get_run_status({run_id})  # the sweep, then none for a minute
    token = _expire_claim(state, task_id)
    assert _token(state, task_id) == token  # not swept
    assert state.acknowledge_task_heartbeat(task_id) is False
    assert state.get_task_by_token(token) is None  # nor does the token authenticate the task any longer
