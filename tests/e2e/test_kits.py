"""Provisioned kits end to end: `fedsilo provision`, `coordinator start`, `silo start` (x2), `coordinator status`,
`plan submit`, as separate real processes on loopback, each stopped by its PID."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from compliance import verify_log
from coordinator.pki import create_node_key
from fedsilo.demo import sign_plan
from fedsilo.processes import descendant_pids, free_port
from silo_agent.approvals import decide, import_bundle
from silo_agent.node import install_kit, load_site_kit
from silo_agent.site import register_dataset

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e-b")]

FEDSILO = [sys.executable, "-m", "fedsilo.cli"]
FEDERATION = "e2e-kits"


def _spawn(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _wait_for(what: str, check, proc_logs: list[tuple[subprocess.Popen, Path]], timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        for proc, log in proc_logs:
            assert proc.poll() is None, f"{log.name} exited with {proc.returncode}: {log.read_text()[-1500:]}"
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


def _running(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _status(kit: Path) -> dict | None:
    done = subprocess.run([*FEDSILO, "coordinator", "status", "--kit", str(kit), "--json"], capture_output=True, text=True, timeout=120)
    return json.loads(done.stdout) if done.returncode == 0 else None


def test_kits_start_a_federation_that_runs_a_submitted_plan(tmp_path, e2e_plan):
    from pipelines.synthetic import write_synthetic_federation

    port = free_port()
    project = tmp_path / "project.yaml"
    project.write_text(yaml.safe_dump({
        "federation": FEDERATION, "coordinator": {"addresses": ["127.0.0.1"], "port": port},
        "sites": [{"id": "hospital0", "officers": ["h0.officer"]}, {"id": "hospital1", "officers": ["h1.officer"]}],
    }))
    kits = tmp_path / "kits"
    done = subprocess.run([*FEDSILO, "provision", str(project), "--out", str(kits)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    coordinator_kit = kits / "coordinator"

    # Each hospital sets up its site folder from its kit, registers its data, and its officer approves the plan.
    silos = write_synthetic_federation(tmp_path / "data", silos=2, size=16, sizes=[8, 8])
    plan = yaml.safe_load(e2e_plan.read_text())
    plan["federation"]["rounds"] = 1
    e2e_plan.write_text(yaml.safe_dump(plan))
    bundle = sign_plan(tmp_path, e2e_plan)
    sites = []
    for silo in silos:
        site = install_kit(load_site_kit(kits / silo.name), tmp_path / "sites" / silo.name, report=lambda _: None)
        site = register_dataset(site, "synthetic", task="seg3d", datalist=silo.datalist)
        decide(site, import_bundle(site, bundle), officer=f"h{silo.name[-1]}.officer", decision="approved")
        sites.append(site)

    # A node key the coordinator never registered, with a valid TLS trust anchor: the SuperLink must refuse it.
    rogue = tmp_path / "rogue-kit"
    shutil.copytree(kits / "hospital1", rogue)
    for name in ("node.key", "node.pub"):
        (rogue / name).unlink()
    create_node_key(rogue, "hospital1", stem="node")

    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[tuple[subprocess.Popen, Path]] = []
    intruder = None
    try:
        coordinator = _spawn([*FEDSILO, "coordinator", "start", "--kit", str(coordinator_kit), "--host", "127.0.0.1"], logs / "coordinator.log")
        procs.append((coordinator, logs / "coordinator.log"))
        _wait_for("the coordinator", lambda: "listening on 127.0.0.1" in (logs / "coordinator.log").read_text(), procs, 90)
        for site in sites:
            log = logs / f"{site.site_id}.log"
            procs.append((_spawn([sys.executable, "-m", "silo_agent.node", "--kit", str(kits / site.site_id), "--site-dir", str(site.root)], log), log))
        intruder = _spawn([sys.executable, "-m", "silo_agent.node", "--kit", str(rogue), "--site-dir", str(tmp_path / "rogue-site"),
                           "--isolation", "subprocess"], logs / "rogue.log")

        status = _wait_for("both sites online", lambda: (s := _status(coordinator_kit)) and s["online"] == 2 and s, procs, 120)
        assert {s["site"]: s["status"] for s in status["sites"]} == {"hospital0": "online", "hospital1": "online"}

        assert intruder.wait(timeout=120) != 0
        rogue_log = (logs / "rogue.log").read_text()
        assert "refused site hospital1's node key" in rogue_log, rogue_log[-1500:]

        pids = [p.pid for p, _ in procs] + [pid for p, _ in procs for pid in descendant_pids(p.pid)]
        submitted = subprocess.run([*FEDSILO, "plan", "submit", str(bundle), "--federation", FEDERATION, "--kit", str(coordinator_kit)],
                                   capture_output=True, text=True, timeout=600)
        print(submitted.stdout, submitted.stderr, sep="\n")  # shown with pytest -s: the table and where its last line came from
        assert submitted.returncode == 0, submitted.stderr[-2000:]
        header, row = submitted.stdout.splitlines()[:2]
        assert header.split()[:2] == ["round", "silos"] and "dice h0" in header and "eps h1" in header
        assert row.split()[:2] == ["1", "2/2"]
        assert "finished after 1 round(s)" in submitted.stderr and "reached neither" not in submitted.stderr

        # Signed by the researcher but approved nowhere: every silo refuses it, the failure reaches the submitter (exit 1).
        altered = tmp_path / "altered" / "plan.yaml"
        altered.parent.mkdir()
        altered.write_text(e2e_plan.read_text().replace("local_epochs: 1", "local_epochs: 2"))
        refused = subprocess.run([*FEDSILO, "plan", "submit", str(altered), "--key", str(tmp_path / "pki" / "researcher" / "demo-researcher.key"),
                                  "--federation", FEDERATION, "--kit", str(coordinator_kit)], capture_output=True, text=True, timeout=600)
        print(refused.stdout, refused.stderr, sep="\n")
        assert refused.returncode == 1, refused.stderr[-2000:]
        assert "failed: round 1: 0 valid update(s) of 2 silo(s)" in refused.stderr

        status = _status(coordinator_kit)
        runs = {r["status"]: r for r in status["runs"]}
        assert set(runs) == {"finished:completed", "finished:failed"}
        run = runs["finished:completed"]
    finally:
        if intruder is not None and intruder.poll() is None:  # SIGTERM: it stops its own SuperNode, by PID
            os.killpg(intruder.pid, signal.SIGTERM)
            intruder.wait(timeout=60)
        for proc, _ in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, _ in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                raise
    for proc, log in procs:
        assert proc.returncode == 0, f"{log.name}: {log.read_text()[-1000:]}"
    assert not [pid for pid in pids if _running(pid)], "a process outlived its stop"

    # The ServerApp used the coordinator's state folder: the run's folder, its signing key, the sites' witness keys.
    run_dir = coordinator_kit / "runs" / run["run_id"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["rounds"][0]["sites"]) == {"hospital0", "hospital1"}
    result = verify_log(run_dir / "audit", keys=coordinator_kit / "audit-trust", witnesses=[s.audit_dir for s in sites])
    assert result.signatures_checked and len(result.witnesses) == 2
    assert "registered site hospital0" in (logs / "coordinator.log").read_text()
