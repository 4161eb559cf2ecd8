"""The warm executor's pacing: it asks the SuperNode for tasks rarely while its ClientApp child runs.

The executor itself (a fork per message beside a real SuperNode) runs in tests/e2e and `fedsilo bench round`.
"""

from __future__ import annotations

import pytest

from silo_agent import warm_exec


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> _Clock:
    monkeypatch.setattr(warm_exec, "_children", set())
    monkeypatch.setattr(warm_exec, "_last_busy", 0.0)
    return _Clock()


def _child_until(monkeypatch, clock: _Clock, ends_at: float | None) -> None:
    """One running child, which ends at ``ends_at`` on the clock (None: never)."""
    warm_exec._children.add(4242)

    def reap() -> None:
        if ends_at is not None and clock.now >= ends_at:
            warm_exec._children.discard(4242)

    monkeypatch.setattr(warm_exec, "reap", reap)


def _pause(clock: _Clock, seconds: float = 0.1) -> float:
    warm_exec.paced_sleep(seconds, busy_poll_s=1.0, check_s=0.05, idle_after_s=300.0, idle_poll_s=1.0, clock=clock.monotonic,
                          sleep=clock.sleep)
    return clock.now


def test_without_a_child_it_waits_the_tuned_interval(clock):
    assert _pause(clock) == pytest.approx(0.1)


def test_a_running_child_holds_the_next_ask_until_it_ends(monkeypatch, clock):
    _child_until(monkeypatch, clock, ends_at=0.42)
    assert 0.42 <= _pause(clock) <= 0.42 + 0.05 + 1e-9  # noticed within one local check


def test_a_child_that_runs_on_is_asked_past_every_busy_interval(monkeypatch, clock):
    _child_until(monkeypatch, clock, ends_at=None)
    assert _pause(clock) == pytest.approx(1.0)  # never longer than busy_poll_s between two asks


def test_the_executor_loop_pauses_with_paced_sleep():
    from flwr.supercore.superexec import run_superexec

    before = run_superexec.time
    try:
        warm_exec.install_busy_pacing()
        assert run_superexec.time.sleep is warm_exec.paced_sleep
        assert run_superexec.time.monotonic is before.monotonic  # the rest of the clock is Flower's own
    finally:
        run_superexec.time = before


def test_an_executor_idle_since_its_last_child_asks_once_a_second(clock):
    clock.now = 299.0
    assert _pause(clock) == pytest.approx(299.1)  # within IDLE_AFTER_S of the last child: the tuned interval
    clock.now = 300.0
    assert _pause(clock) == pytest.approx(301.0)


def test_a_child_restarts_the_idle_count(monkeypatch, clock):
    clock.now = 500.0
    _child_until(monkeypatch, clock, ends_at=500.3)
    _pause(clock)
    assert warm_exec._last_busy == pytest.approx(500.3, abs=0.05 + 1e-9)
    start = clock.now
    assert _pause(clock) == pytest.approx(start + 0.1)
