"""Stopping a process by PID stops what it started too, even in sessions of their own (fedsilo.processes)."""

from __future__ import annotations

import subprocess
import sys
import time

from fedsilo.processes import _running, _stop_pid, descendant_pids

# A parent that starts a child in a new session (as Flower's SuperExec starts a ServerApp), then keeps running.
PARENT = """
import subprocess, sys, time
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
print("started", flush=True)
time.sleep(120)
"""


def test_stopping_a_pid_stops_the_children_it_started_in_other_sessions():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "started"
        deadline = time.monotonic() + 30
        while not (children := descendant_pids(parent.pid)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(children) == 1
        _stop_pid(parent.pid, grace_s=5.0)
        parent.wait(timeout=10)
        assert not _running(children[0])
    finally:
        parent.kill()
        parent.wait(timeout=10)
