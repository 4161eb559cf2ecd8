"""Flower's waiting, tuned for cross-silo rounds: poll in tenths of a second, not in seconds.

Measured on this stack (Flower 1.42, 2 silos, 2D model, loopback): a round whose silos trained for
2 s took 70 s, almost all of it waiting. Flower moves each message as a tree of objects and waits in
three places, each with a fixed interval written for large, busy fleets:

- object pulls (``flwr.supercore.inflatable.inflatable_utils.pull_objects``): an object that the
  sender has not pushed yet is retried with exponential backoff from 1 s up to 10 s, and a message
  is pulled before all of its objects have arrived, so every hop (ServerApp -> SuperLink ->
  SuperNode -> ClientApp and back) can sleep 1 + 2 + 4 + ... seconds;
- the SuperNode asks the SuperLink for new messages every 3 s and checks for the ClientApp's reply
  every 0.5 s (``flwr.supernode.start_client_internal``);
- the SuperExec looks for new tasks every 1 s (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``);
- a SuperNode sends a heartbeat every 30 s and the SuperLink deems it gone after two missed ones, so
  a silo that crashed cannot rejoin (its key is still "active") for about a minute. Tuned, it beats
  every 10 s (Flower's minimum), and a restarted silo is back within about 20 s.

A cross-silo federation has a handful of nodes, so polling ten times faster during a run costs the
SuperLink little and removes most of a round's overhead. Between runs it would not be little (ten
authenticated requests a second per silo, for days), so a SuperNode idle for :data:`IDLE_AFTER_S`
polls every :data:`IDLE_POLL_S` (:class:`IdleBackoff`). Flower exposes only the SuperExec interval
as a setting; the other intervals are module constants bound at import, so :func:`apply` sets them
on the loaded modules (keyword defaults and the module's ``time`` reference). Everything here is
opt-in, per process, and leaves Flower's protocol untouched. The ServerApp side polls through the
public Grid API (see coordinator.federation) at :data:`POLL_S`.

``python -m fedsilo.flower_tuning flower-supernode ARGS...`` starts a Flower console command with the
tuning applied (how fedsilo starts SuperNodes); ``... flower-superlink ARGS...`` also holds the
SuperLink's empty pulls until something is pushed (fedsilo.flower_longpoll), so that the tuned
polling costs it little, and sweeps expired task tokens once a second instead of before every request
(fedsilo.flower_housekeeping), keeps the Control API's middlewares off Fleet and runtime requests
(fedsilo.flower_http) and switches threads every 1 ms.
"""

from __future__ import annotations

import os
import sys
import time as _time
from types import SimpleNamespace

#: Set in a Flower process's environment to turn the tuning on (fedsilo's launchers set it).
ENV = "FEDSILO_FLOWER_POLL_S"
#: The polling interval (seconds) when tuned.
POLL_S = 0.1
#: Object-pull retry backoff when tuned: first retry after this, doubling up to the cap (a ClientApp pulling
#: from its SuperNode was seen waiting ~0.3 s past the objects' arrival with a 0.5 s cap).
PULL_BACKOFF_S = (0.05, 0.2)
#: How often the SuperLink's own SuperExec looks for a ServerApp to launch (see superlink_env).
SUPERLINK_TASK_POLL_S = 1.0
#: The SuperLink's GIL switch interval (Python's default: 0.005 s); see main().
SUPERLINK_SWITCH_S = 0.001
#: SuperNode heartbeat interval when tuned (Flower's HEARTBEAT_MIN_INTERVAL).
HEARTBEAT_S = 10
#: After this long without a message or a reply, a tuned SuperNode (and a silo's warm executor) polls every
#: IDLE_POLL_S instead of every POLL_S. Between runs (hours, days) each silo would otherwise make ten
#: authenticated requests a second to the SuperLink, 10 to 20 ms of its CPU each: half a core for 3 idle silos.
#: Within a run a silo waits at most a round for its next message; a wait longer than this gets its message
#: up to IDLE_POLL_S later, under 0.4% of it.
IDLE_AFTER_S = 300.0
IDLE_POLL_S = 1.0


class IdleBackoff:
    """The SuperNode's sleeps, capped at the tuned interval, or at :data:`IDLE_POLL_S` once it has been idle for
    :data:`IDLE_AFTER_S` (no message pulled, no reply pushed)."""

    def __init__(self, interval: float, *, idle_after_s: float = IDLE_AFTER_S, idle_poll_s: float = IDLE_POLL_S,
                 clock=_time.monotonic, sleep=_time.sleep) -> None:
        self.interval, self.idle_after_s, self.idle_poll_s = interval, idle_after_s, idle_poll_s
        self.clock, self._sleep = clock, sleep
        self.last_active = clock()

    def active(self) -> None:
        """A message came in or a reply went out."""
        self.last_active = self.clock()

    def cap(self) -> float:
        idle = self.clock() - self.last_active >= self.idle_after_s
        return max(self.interval, self.idle_poll_s) if idle else self.interval

    def sleep(self, seconds: float) -> None:
        self._sleep(min(seconds, self.cap()))


def poll_interval() -> float | None:
    """The tuned polling interval from the environment, or None when this process is not tuned."""
    raw = os.environ.get(ENV, "")
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if 0.01 <= value <= 5.0 else None


def tuned_env(env: dict[str, str], interval: float = POLL_S) -> dict[str, str]:
    """``env`` with the tuning switched on for Flower processes started with it (and their children)."""
    return {**env, ENV: str(interval), "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(interval)}


def superlink_env(env: dict[str, str], interval: float = POLL_S) -> dict[str, str]:
    """``env`` for a SuperLink: its ServerApps tuned (they inherit it), but the SuperLink's own SuperExec, which only
    launches a ServerApp when a run starts, polls every :data:`SUPERLINK_TASK_POLL_S`. At 0.1 s that idle poll was
    most of the SuperLink's requests (842 of about 1,600 in a 2-round run), each competing with a round's transfers
    for the SuperLink's single worker; a run then starts up to a second later."""
    return {**tuned_env(env, interval), "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(SUPERLINK_TASK_POLL_S)}


def clock_with_sleep(sleep) -> SimpleNamespace:
    """A stand-in for the ``time`` module of a Flower module whose loop sleeps: the real clock, with ``sleep``."""
    clock = {k: getattr(_time, k) for k in dir(_time) if not k.startswith("_")}
    clock["sleep"] = sleep
    return SimpleNamespace(**clock)


def apply(interval: float | None = None) -> bool:
    """Tune the Flower modules loaded in this process; returns whether anything was tuned."""
    interval = poll_interval() if interval is None else interval
    if interval is None:
        return False
    from flwr.supercore.inflatable import inflatable_utils

    first, cap = PULL_BACKOFF_S
    for fn in (inflatable_utils.pull_objects, inflatable_utils.pull_and_inflate_object_from_tree):
        if fn.__kwdefaults__ and "initial_backoff" in fn.__kwdefaults__:
            fn.__kwdefaults__.update(initial_backoff=first, backoff_cap=cap)
    try:
        from flwr.supernode import fleet_http_connection, start_client_internal
    except ImportError:  # pragma: no cover - only where the SuperNode is not installed
        return True
    # The interval the SuperNode declares to the SuperLink, and the one its sender beats at (both
    # modules import Flower's constant by name, so each gets the tuned value).
    from flwr.supercore import heartbeat

    fleet_http_connection.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_S
    heartbeat.HEARTBEAT_DEFAULT_INTERVAL = HEARTBEAT_S
    # The SuperNode's loop sleeps 3 s between polls for messages and 0.5 s between checks for its ClientApp's
    # reply and the reply's objects; tuned, it sleeps a tenth of a second at most, and wakes as soon as the
    # ClientApp pushes (through this process's own runtime API) instead of at the next tenth.
    from flwr.supernode.servicer.runtime import runtime_handlers

    from fedsilo.flower_longpoll import Arrivals, announcing

    pushed = Arrivals()
    runtime_handlers.push_messages = announcing(runtime_handlers.push_messages, pushed)
    runtime_handlers.push_object = announcing(runtime_handlers.push_object, pushed)
    backoff = IdleBackoff(interval, sleep=pushed.sleep)
    start_client_internal.time = clock_with_sleep(backoff.sleep)
    _mark_activity(start_client_internal, backoff)
    return True


def _mark_activity(module, backoff: IdleBackoff) -> None:
    """Tell ``backoff`` when the SuperNode loop (``module``) pulls a message or pushes its reply (both are module
    functions it calls by name)."""
    pull, push = module._pull_and_store_message, module._push_messages

    def pull_and_store_message(*args, **kwargs):
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            backoff.active()
        return run_id

    def push_messages(*args, **kwargs):
        backoff.active()  # and while it waits for the ClientApp's reply: a long training is not idleness
        try:
            return push(*args, **kwargs)
        finally:
            backoff.active()

    pull_and_store_message.backoff = push_messages.backoff = backoff  # for tests: the one whose sleep the loop uses
    module._pull_and_store_message, module._push_messages = pull_and_store_message, push_messages


def main(argv: list[str]) -> int:
    """Run a Flower console command (``flower-supernode``, ``flower-superlink``) with the tuning applied."""
    from importlib.metadata import entry_points

    if not argv:
        print("usage: python -m fedsilo.flower_tuning FLOWER-COMMAND [ARGS...]", file=sys.stderr)
        return 2
    matches = [ep for ep in entry_points(group="console_scripts") if ep.name == argv[0] and ep.value.startswith("flwr")]
    if not matches:
        print(f"fedsilo.flower_tuning: '{argv[0]}' is not a Flower command", file=sys.stderr)
        return 2
    command = matches[0].load()
    if apply() and argv[0] == "flower-superlink":
        from fedsilo.flower_longpoll import HOLD_S, install

        install()  # its pulls held until something is pushed, instead of polled ten times a second
        print(f"fedsilo: SuperLink long polling on: an empty pull is held up to {HOLD_S:g} s until something is pushed",
              flush=True)
        from fedsilo import flower_housekeeping

        swept = flower_housekeeping.install()  # not before every request
        print(f"fedsilo: SuperLink sweeps expired task tokens at most every {swept.interval_s:g} s", flush=True)
        from fedsilo import flower_http

        flower_http.install()  # the Control API's middlewares off Fleet and runtime requests
        # The event loop wakes for every request step while handler threads run SQL; with Python's default 5 ms
        # switch interval each wake can wait that long for the GIL (the convoy effect, bpo-7946).
        sys.setswitchinterval(SUPERLINK_SWITCH_S)
        print("fedsilo: SuperLink serves Fleet and runtime requests without the Control API's middlewares; "
              f"thread switch interval {SUPERLINK_SWITCH_S * 1000:g} ms", flush=True)
    sys.argv = list(argv)
    return int(command() or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
