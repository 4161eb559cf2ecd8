"""kill -9 in the middle of appends: everything committed survives and verifies, checkpoints included."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import compliance
from audit_helpers import LOG_KEY
from compliance import AuditLog, EventType, load_signer, verify_log
from compliance.audit_log import DB_NAME

# Appends forever: single records and batches of 7, a checkpoint every 5 records, as fast as it can.
WRITER = """
import sys
from compliance import AuditLog, EventType, load_signer
path, keys, name = sys.argv[1:4]
actor = {"kind": "coordinator", "id": "coordinator", "site": None}
with AuditLog.open(path, signer=load_signer(keys, name), checkpoint_every=5) as log:
    i = 0
    while True:
        if i % 3:
            log.append(EventType.UPDATE_RECEIVED, actor=actor, round=i, details={"i": i, "l2_norm": i / 7})
        else:
            with log.batch():
                for j in range(7):
                    log.append(EventType.DP_SPENT, actor=actor, round=i, details={"i": i, "j": j})
        i += 1
"""


def _count(path: Path) -> int:
    try:
        with sqlite3.connect(f"{(path / DB_NAME).resolve().as_uri()}?mode=ro", uri=True) as conn:
            return conn.execute("SELECT COUNT(*) FROM records").fetchone()[0]
    except sqlite3.Error:
        return 0


def test_kill_9_in_the_middle_of_appends(tmp_path: Path, key_dir: Path, trusted_dir: Path) -> None:
    path = tmp_path / "audit"
    root = Path(compliance.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    for run in range(2):  # crash, then resume on the crashed log and crash again
        target = _count(path) + 150
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(key_dir), LOG_KEY], env=env)
        try:
            deadline = time.monotonic() + 60
            while _count(path) < target:
                assert writer.poll() is None, f"the writer exited with {writer.returncode}"
                assert time.monotonic() < deadline, "the writer made no progress"
                time.sleep(0.02)
        finally:
            os.kill(writer.pid, signal.SIGKILL)  # our own child, mid-append
            writer.wait()
        assert writer.returncode == -signal.SIGKILL
        result = verify_log(path, keys=trusted_dir)
        assert result.records >= target
        assert result.checkpoints == result.records // 5  # every fifth record's checkpoint made it, no more
        assert result.unanchored == result.records % 5
    with AuditLog.open(path, signer=load_signer(key_dir, LOG_KEY)) as log:
        log.append(EventType.RUN_FINISHED, actor={"kind": "coordinator", "id": "coordinator"})
        log.sign_checkpoint()
    assert verify_log(path, keys=trusted_dir).unanchored == 0
