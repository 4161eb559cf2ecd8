"""Start, watch and stop the federation's processes (SuperLink, SuperNodes, flwr CLI).

Every process is started in its own session, with its output going to a log file, and is
stopped by its PID (its process group: SIGTERM, then SIGKILL after a grace period). A
:class:`ProcessSet` stops everything it started, in reverse order, on exit, on error and on
Ctrl-C. Servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedsilo.errors import DeploymentError

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def flower_env(flwr_home: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for Flower processes: home inside the run folder, no telemetry, no installs."""
    env = dict(os.environ if base is None else base)
    # Flower starts its own helpers (flower-superexec, flwr-serverapp, flwr-clientapp) from PATH:
    # put this environment's scripts first, also when fedsilo runs without an activated venv.
    scripts = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([scripts, env.get("PATH", "")])
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "PYTHONUNBUFFERED": "1",
    })
    return env


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen
    log_path: Path
    log_offset: int = 0  # the log's size when this process started (a restart appends to the same log)
    port: int | None = None  # the port it serves, where it has one

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        """What this process has written to its log so far (not what an earlier process of the same name wrote)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self.log_offset)
                return f.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text[-lines:])

    def stop(self, grace_s: float = 10.0, *, kill: bool = False) -> None:
        """SIGTERM the process group by PID, then SIGKILL if it has not exited; then its descendants.
        With ``kill``, SIGKILL straight away (how tests stage a crash).

        Flower's SuperLink and SuperNode start helpers in new sessions (SuperExec, which starts the
        ServerApp and ClientApps); those outlive a killed process group, so they are collected
        before the parent stops and stopped by PID after it.
        """
        if self.popen.poll() is not None:
            return
        descendants = descendant_pids(self.pid)
        self._signal_group(grace_s, kill=kill)
        for pid in descendants:
            _stop_pid(pid, kill=kill)

    def _signal_group(self, grace_s: float, *, kill: bool = False) -> None:
        steps = ((signal.SIGKILL, 5.0),) if kill else ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0))
        for sig, wait in steps:
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.popen.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def descendant_pids(pid: int) -> list[int]:
    """All processes below ``pid`` (children first), from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Field 4 is the parent PID; the command name in field 2 may hold spaces, so split after ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def _stop_pid(pid: int, grace_s: float = 5.0, *, kill: bool = False) -> None:
    """Stop one process by PID and whatever it has started, leaves first (reaping is each parent's job).

    The tree is frozen first (SIGSTOP, gathered again until nothing new appears), so a helper that launches a
    process while the federation stops (Flower's SuperExec starting a ServerApp or ClientApp in a session of its
    own) cannot leave it behind as an orphan. Then each process gets SIGTERM (``kill``: SIGKILL), is let run to
    handle it, and gets SIGKILL after ``grace_s``."""
    frozen: list[int] = []
    todo = [pid]
    while todo:
        for p in todo:
            try:
                os.kill(p, signal.SIGSTOP)
            except ProcessLookupError:
                continue
            frozen.append(p)
        todo = [p for p in descendant_pids(pid) if p not in frozen] if frozen else []
    for p in reversed(frozen):  # leaves first: a parent that waits for its children does not wait on frozen ones
        _terminate(p, grace_s, kill=kill)


def _terminate(pid: int, grace_s: float, *, kill: bool) -> None:
    """SIGTERM (then SIGCONT, so a frozen process handles it), wait, then SIGKILL; ``kill``: SIGKILL only."""
    for sig in (signal.SIGKILL,) if kill else (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not _running(pid):
                return
            time.sleep(0.1)


def _running(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent can reap it


class ProcessSet:
    """Processes started together and stopped together (context manager)."""

    def __init__(self, logs_dir: Path, env: Mapping[str, str]) -> None:
        self.logs_dir = logs_dir
        self.env = dict(env)
        self.processes: list[ManagedProcess] = []
        logs_dir.mkdir(parents=True, exist_ok=True)

    def start(self, name: str, argv: Sequence[str], *, cwd: Path | None = None, env: Mapping[str, str] | None = None) -> ManagedProcess:
        """Start ``argv`` in its own session, output to logs/NAME.log, with ``env`` (default: the set's)."""
        log_path = self.logs_dir / f"{name}.log"
        offset = log_path.stat().st_size if log_path.exists() else 0
        log_file = open(log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
        try:
            popen = subprocess.Popen(list(argv), stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=dict(env) if env is not None else self.env, cwd=cwd, start_new_session=True)
        except FileNotFoundError:
            raise DeploymentError(f"cannot start {name}: {argv[0]} not found", fix="run 'make venv' (or activate .venv) so Flower's commands are on PATH") from None
        finally:
            log_file.close()
        proc = ManagedProcess(name=name, popen=popen, log_path=log_path, log_offset=offset)
        self.processes.append(proc)
        return proc

    def wait_for_port(self, proc: ManagedProcess, port: int, timeout_s: float = 60.0) -> None:
        """Wait until ``port`` accepts connections, failing fast if ``proc`` dies."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not proc.alive():
                raise DeploymentError(f"{proc.name} exited with code {proc.popen.returncode} before listening on port {port}: {proc.log_tail()}",
                                      fix=f"read {proc.log_path}")
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                if s.connect_ex((LOOPBACK, port)) == 0:
                    return
            time.sleep(0.2)
        raise DeploymentError(f"{proc.name} did not listen on port {port} within {timeout_s:.0f} s", fix=f"read {proc.log_path}")

    def finish(self, proc: "ManagedProcess", *, kill: bool = False) -> None:
        """Stop ``proc`` if it still runs and forget it: a finished job's exit code is not a failure of the set.

        Forgotten first, so that a check made meanwhile from another thread (a crash staged while a run is
        followed) does not take the stop for a failure; kept if stopping it fails, so that stop_all still can.
        """
        self.processes.remove(proc)
        try:
            proc.stop(grace_s=5.0, kill=kill)
        except BaseException:
            self.processes.append(proc)
            raise

    def check_alive(self) -> None:
        for proc in list(self.processes):
            if not proc.alive() and proc.popen.returncode not in (0, None):
                raise DeploymentError(f"{proc.name} stopped with exit code {proc.popen.returncode}: {proc.log_tail()}", fix=f"read {proc.log_path}")

    def stop_all(self) -> None:
        for proc in reversed(self.processes):
            proc.stop()

    def __enter__(self) -> "ProcessSet":
        # Ctrl-C and SIGTERM both unwind through __exit__, which stops every child. SIGINT is set
        # explicitly: a parent that started us in the background may have left it ignored.
        self._old = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.stop_all()
        finally:
            for sig, handler in self._old.items():
                signal.signal(sig, handler)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_command(argv: Sequence[str], *, env: Mapping[str, str], cwd: Path | None = None, timeout_s: float = 120.0, what: str) -> str:
    """Run a short command to completion; a failure is a DeploymentError with its last output."""
    try:
        done = subprocess.run(list(argv), env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise DeploymentError(f"cannot {what}: {argv[0]} not found", fix="run 'make venv' so Flower's commands are on PATH") from None
    except subprocess.TimeoutExpired:
        raise DeploymentError(f"cannot {what}: no answer within {timeout_s:.0f} s", fix="check that the SuperLink is running") from None
    if done.returncode != 0:
        tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-3:])
        raise DeploymentError(f"cannot {what} (exit {done.returncode}): {tail}", fix="see the message above")
    return done.stdout
