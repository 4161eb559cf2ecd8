"""A warm executor for the silo's ClientApp: one fork per message from a process that has imported torch once.

Flower 1.42's SuperNode, in its default ``--isolation subprocess`` mode, starts Flower's SuperExec,
which launches a fresh ``flwr-clientapp`` process for every message; each one imports torch, MONAI and
Opacus again (several seconds per message on a 2-core machine, most of a small round). Flower's
only pooled executor (``warm_executor``) is for Kubernetes.

With ``flower-supernode --isolation process`` the SuperNode leaves launching to an external SuperExec:
this module. It is Flower's own SuperExec (``flower-superexec``: the same task loop, tokens and Runtime
API), with one change: a ClientApp task is started with ``os.fork()`` from this pre-warmed process
instead of ``subprocess.Popen``. Each message still runs in its own short-lived process, so a crash, a
leak or a hung message never reaches the next one, and the SuperNode sees exactly what it sees from
``flwr-clientapp``; only the import cost is paid once per silo instead of once per message.

Run it beside the SuperNode (``fedsilo.local_federation`` does): ``python -m silo_agent.warm_exec
--insecure --runtime-api-address 127.0.0.1:PORT --parent-pid SUPERNODE_PID``. The Runtime API listens
on loopback only; ``--insecure`` refers to that local hop, the SuperNode-SuperLink link keeps its TLS.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Sequence

from fedsilo.flower_tuning import IDLE_AFTER_S, IDLE_POLL_S, clock_with_sleep

#: Imported once in the parent; every forked ClientApp process inherits them.
PRELOAD = ("torch", "monai.networks.nets", "monai.transforms", "opacus", "flwr.app", "flwr.clientapp",
           "flwr.supernode.cli.flwr_clientapp", "pipelines.training", "pipelines.networks", "pipelines.metrics",
           "pipelines.dataset", "silo_agent.client_app")

_children: set[int] = set()

#: How often to ask the SuperNode for a task while a forked ClientApp runs. The SuperNode handles one message at a
#: time (``flwr.supernode.start_client_internal`` pulls a message, then waits for its reply before it pulls the
#: next), so no next message can come before the child has sent its reply, and the child exits right after
#: (Flower's on-exit steps: its task output, its heartbeat). Each ask is an HTTP request that costs the SuperNode
#: about 10 ms of CPU; at the tuned 0.1 s that was 0.12-0.14 of a core across 3 SuperNodes and 0.06 in the
#: executors, taken from training on the 2-core bench machine. Not "never": a task that comes while a child is
#: still exiting (or one a running task creates) waits at most this long.
BUSY_POLL_S = 1.0
#: How often a busy executor looks (locally, ``waitpid``) whether its child has ended.
CHILD_CHECK_S = 0.05
#: When a ClientApp child last ran (or the executor started): the idle slow-down counts from here.
_last_busy = time.monotonic()


def preload(modules: Sequence[str] = PRELOAD) -> float:
    """Import the ClientApp's heavy modules; returns the seconds it took."""
    import importlib

    start = time.perf_counter()
    for name in modules:
        importlib.import_module(name)
    return time.perf_counter() - start


def reap() -> None:
    """Collect finished children so none lingers as a zombie."""
    for pid in list(_children):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            _children.discard(pid)


def paced_sleep(seconds: float, *, busy_poll_s: float = BUSY_POLL_S, check_s: float = CHILD_CHECK_S,
                idle_after_s: float = IDLE_AFTER_S, idle_poll_s: float = IDLE_POLL_S, clock=time.monotonic, sleep=time.sleep) -> None:
    """The executor's pause between two asks for a task: ``seconds``, and while a ClientApp child still runs, on
    until it ends or ``busy_poll_s`` have passed in all. A child that ends is noticed within ``check_s``, so the
    next task is asked for as soon as there can be one. With no child for ``idle_after_s`` (between runs), at
    least ``idle_poll_s`` (fedsilo.flower_tuning.IDLE_AFTER_S: the SuperNode slows down alike)."""
    global _last_busy
    reap()
    if not _children:
        sleep(max(seconds, idle_poll_s) if clock() - _last_busy >= idle_after_s else seconds)
        return
    deadline = clock() + max(busy_poll_s, seconds)
    sleep(seconds)
    reap()
    while _children and clock() < deadline:
        sleep(min(check_s, max(0.0, deadline - clock())))
        reap()
    _last_busy = clock()


def install_busy_pacing() -> None:
    """Make Flower's SuperExec loop pause with :func:`paced_sleep` (its ``time.sleep(task_poll_interval)``)."""
    from flwr.supercore.superexec import run_superexec

    run_superexec.time = clock_with_sleep(paced_sleep)


def _run_clientapp_child(args: list[str]) -> None:
    """In the forked child: run ``flwr-clientapp`` with ``args`` in this process, then exit."""
    code = 1
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

        sys.argv = ["flwr-clientapp", *args[1:]]
        flwr_clientapp()
        code = 0
    except SystemExit as exc:  # Flower ends every task with flwr_exit -> sys.exit(code)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - the child must never return into the parent's loop
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def install_fork_launcher() -> None:
    """Make Flower's subprocess executor fork this warm process for ClientApp tasks."""
    import subprocess

    from flwr.supercore.superexec.executor import subprocess_executor as sx

    original_popen = subprocess.Popen

    class _ForkingPopen:
        """Stands in for ``subprocess.Popen`` inside Flower's executor: forks for ``flwr-clientapp``."""

        def __new__(cls, args, *rest, **kwargs):
            if not (isinstance(args, list) and args and args[0] == "flwr-clientapp"):
                return original_popen(args, *rest, **kwargs)
            reap()
            pid = os.fork()
            if pid == 0:
                _run_clientapp_child(list(args))
            _children.add(pid)
            return None

    sx.subprocess = type("subprocess_with_fork", (), {"Popen": _ForkingPopen, "DEVNULL": subprocess.DEVNULL})
    original_reconcile = sx.SubprocessExecutor.reconcile

    def reconcile(self) -> None:
        reap()
        original_reconcile(self)

    sx.SubprocessExecutor.reconcile = reconcile


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m silo_agent.warm_exec [flower-superexec options]``."""
    seconds = preload()
    print(f"fedsilo warm executor: ClientApp modules imported once in {seconds:.1f} s; each message forks from here", flush=True)
    install_fork_launcher()
    install_busy_pacing()
    from fedsilo import flower_tuning

    flower_tuning.apply()  # inherited by every forked ClientApp: fast object pulls from the SuperNode
    from flwr.supercore.cli import flower_superexec

    sys.argv = ["flower-superexec", *(sys.argv[1:] if argv is None else argv)]
    return int(flower_superexec() or 0)


if __name__ == "__main__":
    sys.exit(main())
