"""``fedsilo plan submit``: start a signed plan on a running coordinator through Flower and follow its rounds.

The researcher's machine runs ``flwr run APP FEDERATION --stream`` with the submission bundle (the plan,
the researcher's Ed25519 signature over it, and the researcher's public key) in the run config key
``submission``; the coordinator's ServerApp verifies it, and each silo checks it against its officers'
approval before reading any data. The ServerApp prints one ``fedsilo-progress {json}`` line per round
and one at the end (coordinator.progress.PROGRESS_PREFIX); Flower's log stream carries them here, and
they become the round table on stdout.

Exit codes: 0 the run finished; 1 it failed (the reason is printed); 2 bad input (plan, key, connection).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from coordinator.progress import PROGRESS_PREFIX, RoundTable
from fedsilo.errors import ConfigError, DeploymentError
from fedsilo.flower_app import flower_bin, toml_string, write_flower_app

EXIT_FINISHED, EXIT_FAILED = 0, 1
#: How often to read the run's stored log for its last lines when the stream ended without them (1 s apart).
LATE_LOG_TRIES = 5


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- what is submitted -------------------------------------------------------------------------------------


def load_submission(plan_path: Path, key: Path | None):
    """(SubmissionBundle, Plan): a signed bundle (.json from ``fedsilo plan sign``), or a plan YAML signed now with ``key``.

    The bundle is verified here (signature, plan hash, exact text) so a mistake fails on the researcher's
    machine with exit 2 instead of at the coordinator.
    """
    from compliance.keys import load_signer
    from compliance.records import utc_now
    from compliance.statements import SubmissionBundle, sign_submission
    from fedsilo.errors import FedsiloError
    from pipelines.plan import parse_plan_text

    if not plan_path.is_file():
        raise ConfigError(f"no plan at {plan_path}", fix="give a plan .yaml (with --key) or a bundle .json from 'fedsilo plan sign'")
    text = plan_path.read_text(encoding="utf-8")
    if plan_path.suffix == ".json":
        if key is not None:
            raise ConfigError(f"{plan_path} is already signed; --key signs a plan .yaml", fix="leave out --key, or give the plan .yaml")
        bundle = SubmissionBundle.from_json(text, str(plan_path))
        plan = parse_plan_text(bundle.plan_text, source=str(plan_path))
        try:
            bundle.verify(plan.hash())
        except FedsiloError as exc:
            raise ConfigError(f"{plan_path}: the signature does not hold ({exc.message})", fix="sign the plan again: fedsilo plan sign") from None
        return bundle, plan
    if key is None:
        raise ConfigError(f"{plan_path} is not signed: every site refuses an unsigned plan",
                          fix="pass --key DIR/NAME.key (from 'fedsilo plan keygen'), or submit the bundle from 'fedsilo plan sign'")
    if key.suffix != ".key":
        raise ConfigError(f"--key {key} is not a .key file", fix="give DIR/NAME.key as written by 'fedsilo plan keygen'")
    plan = parse_plan_text(text, source=str(plan_path))  # imports MONAI (the network allow-list): after the cheap checks
    signer = load_signer(key.parent, key.stem)
    return sign_submission(text, plan.hash(), plan.name, signer, utc_now()), plan


# --- where it goes --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Connection:
    """A Flower home whose config.toml names the federation's SuperLink connection."""

    federation: str
    flwr_home: Path
    temporary: bool = False
    runs_dir: Path | None = None  # on the coordinator's machine (--kit): where the ServerApp writes each run's folder

    def close(self) -> None:
        if self.temporary:
            shutil.rmtree(self.flwr_home, ignore_errors=True)


def connection(federation: str, *, superlink: str | None = None, ca: Path | None = None, kit: Path | None = None,
               insecure_dev: bool = False) -> Connection:
    """The connection to use: ``--superlink ADDRESS --ca ca.crt``; a coordinator kit (``--kit``, on the coordinator's
    machine); or else the connection named FEDERATION in the researcher's own Flower config ($FLWR_HOME or ~/.flwr)."""
    if superlink:
        if ca is None and not insecure_dev:
            raise ConfigError("--superlink needs --ca (the federation's CA certificate, from the researcher kit)",
                              fix="pass --ca KITS/researcher/ca.crt; --insecure-dev connects without TLS on a development machine only")
        if ca is not None and not ca.is_file():
            raise ConfigError(f"no CA certificate at {ca}", fix="give ca.crt from the researcher kit")
        home = Path(tempfile.mkdtemp(prefix="fedsilo-flwr-"))
        security = "insecure = true\n" if insecure_dev else f"root-certificates = {toml_string(str(ca.resolve()))}\n"
        (home / "config.toml").write_text(f'[superlink]\ndefault = "{federation}"\n\n[superlink.{federation}]\n'
                                          f"address = {toml_string(superlink)}\n{security}", encoding="utf-8")
        return Connection(federation, home, temporary=True)
    if kit is not None:
        from coordinator.deployment import load_coordinator_kit

        loaded = load_coordinator_kit(kit)
        if loaded.federation != federation:
            raise ConfigError(f"{kit} is the kit of federation '{loaded.federation}', not '{federation}'", fix=f"pass --federation {loaded.federation}")
        if not (loaded.flwr_cli_home / "config.toml").is_file():
            raise ConfigError(f"the coordinator has not been started from {kit}", fix=f"start it: fedsilo coordinator start --kit {kit}")
        return Connection(federation, loaded.flwr_cli_home, runs_dir=loaded.root / "runs")
    home = Path(os.environ.get("FLWR_HOME") or Path.home() / ".flwr")
    config = home / "config.toml"
    text = config.read_text(encoding="utf-8") if config.is_file() else ""
    if f"[superlink.{federation}]" not in text:
        raise ConfigError(f"no connection '{federation}' in {config}",
                          fix="pass --superlink HOST:PORT --ca ca.crt (from the researcher kit), or add [superlink."
                              f"{federation}] to {config}")
    return Connection(federation, home)


# --- the round table -----------------------------------------------------------------------------------------


def parse_progress(line: str) -> dict[str, Any] | None:
    """The event of a ``fedsilo-progress {json}`` line (anywhere in the line), else None."""
    at = line.find(PROGRESS_PREFIX)
    if at < 0:
        return None
    try:
        event = json.loads(line[at + len(PROGRESS_PREFIX):])
    except json.JSONDecodeError:
        return None
    return event if isinstance(event, dict) and "event" in event else None


# --- submitting and following ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    exit_code: int
    run_id: str | None
    rounds: int
    reason: str | None = None


def submit(bundle, plan, conn: Connection, *, stream: TextIO = sys.stdout, report: Callable[[str], None] = say,
           verbose: bool = False) -> Outcome:
    """``flwr run`` the fedsilo app with the bundle on ``conn`` and print the round table until the run ends."""
    report(f"submitting plan '{plan.name}' ({plan.hash()[:12]}) to federation {conn.federation} ...")
    metric = "dice" if plan.is_segmentation else "accuracy"
    return _run(f"submission = {toml_string(bundle.to_json())}\n", conn, RoundTable(metric, stream), report, verbose)


def resume(run: str, conn: Connection, *, metric: str = "dice", stream: TextIO = sys.stdout, report: Callable[[str], None] = say,
           verbose: bool = False) -> Outcome:
    """Continue an interrupted run (its id, or its folder on the coordinator's machine) after its last completed round."""
    report(f"resuming run {run} on federation {conn.federation} ...")
    return _run(f"resume-from = {toml_string(run)}\n", conn, RoundTable(metric, stream), report, verbose)


def _run(run_config_text: str, conn: Connection, table: "RoundTable", report: Callable[[str], None], verbose: bool) -> Outcome:
    work = Path(tempfile.mkdtemp(prefix="fedsilo-submit-"))
    try:
        app = write_flower_app(work / "app")
        run_config = work / "run-config.toml"
        run_config.write_text(run_config_text, encoding="utf-8")
        env = dict(os.environ)
        env.update({"FLWR_HOME": str(conn.flwr_home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "PYTHONUNBUFFERED": "1"})
        argv = [flower_bin("flwr"), "run", str(app), conn.federation, "--run-config", str(run_config), "--stream"]
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                                    env=env, start_new_session=True, bufsize=1)
        except FileNotFoundError:
            raise DeploymentError(f"cannot start {argv[0]}", fix="install fedsilo's environment (make venv) so Flower's flwr command is on PATH") from None
        return _follow(proc, table, report, verbose, conn)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _follow(proc: subprocess.Popen, table: RoundTable, report: Callable[[str], None], verbose: bool, conn: Connection) -> Outcome:
    run_id: str | None = None
    rounds, tail = 0, []
    outcome: Outcome | None = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            event = parse_progress(line)
            if event is None:
                text = _plain(line)
                if "Successfully started run" in text:
                    run_id = text.split()[-1]
                    report(f"run {run_id} started; following its rounds (Ctrl-C stops following, not the run)")
                elif text:
                    tail = (tail + [text])[-5:]
                    if verbose:
                        report(text)
                continue
            if event["event"] == "round":
                rounds += 1
                table.add(event)
            elif event["event"] == "evaluated":
                table.add(event)
            elif event["event"] == "finished":
                outcome = Outcome(EXIT_FINISHED, run_id, rounds)
            elif event["event"] == "failed":
                outcome = Outcome(EXIT_FAILED, run_id, rounds, str(event.get("reason", "no reason given")))
        code = proc.wait()
    except KeyboardInterrupt:
        _stop(proc)
        where = f"run {run_id}" if run_id else "the run"
        report(f"stopped following {where}; it goes on at the coordinator (flwr log {run_id or 'RUN_ID'} {conn.federation})")
        raise
    if outcome is not None:
        return outcome
    if run_id is None:
        detail = " ".join(tail[-3:]) or f"flwr run exit {code}"
        raise DeploymentError(f"the coordinator did not accept the run: {detail}",
                              fix="check the address, the CA certificate and that the coordinator is running (fedsilo coordinator status)")
    # The stream ended without a final event. Flower ends a run's log stream as soon as the run is marked finished,
    # and the ServerApp's last lines can land just after that (seen under load): read the run's stored log instead.
    for _ in range(LATE_LOG_TRIES):
        for event in _logged_events(run_id, conn) + _run_folder_events(run_id, conn):
            if event["event"] == "round" and int(event.get("round", 0)) > rounds:
                rounds = int(event["round"])
                table.add(event)
            elif event["event"] == "evaluated":
                table.add(event)  # a round already printed, or not yet seen, is left alone
            elif event["event"] == "finished":
                outcome = Outcome(EXIT_FINISHED, run_id, rounds)
            elif event["event"] == "failed":
                outcome = Outcome(EXIT_FAILED, run_id, rounds, str(event.get("reason", "no reason given")))
        if outcome is not None:
            report("(the stream ended before the run's last lines; they were read from the run's log)")
            return outcome
        time.sleep(1.0)
    status, details = _run_status(run_id, conn)
    if details:
        tail.append(details)
    if status == "finished:completed":
        report(f"run {run_id} finished (its last progress line reached neither the stream nor the run's log)")
        return Outcome(EXIT_FINISHED, run_id, rounds)
    return Outcome(EXIT_FAILED, run_id, rounds, f"the run ended as '{status or 'unknown'}' without a result: {' | '.join(tail[-2:])}")


_BOX = "│╭╮╰╯─━┃┏┓┗┛"


def _plain(line: str) -> str:
    """A Flower output line without the frame characters of its boxed error panels."""
    return " ".join(line.translate({ord(c): " " for c in _BOX}).split())


def _logged_events(run_id: str, conn: Connection) -> list[dict[str, Any]]:
    """The progress events in the run's log as the SuperLink stores it (``flwr log RUN_ID --show``)."""
    try:
        done = subprocess.run([flower_bin("flwr"), "log", run_id, conn.federation, "--show"], env=_flwr_env(conn), capture_output=True,
                              text=True, timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [e for e in map(parse_progress, done.stdout.splitlines()) if e is not None]


def _flwr_env(conn: Connection) -> dict[str, str]:
    return dict(os.environ, FLWR_HOME=str(conn.flwr_home), FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1")


def _run_folder_events(run_id: str, conn: Connection) -> list[dict[str, Any]]:
    """On the coordinator's machine: the progress rows the ServerApp wrote to the run folder (``logs/rounds.jsonl``)."""
    if conn.runs_dir is None or not run_id.isdigit():
        return []
    path = conn.runs_dir / run_id / "logs" / "rounds.jsonl"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    return [e for e in map(parse_progress, (PROGRESS_PREFIX + line for line in lines)) if e is not None]


def _run_status(run_id: str, conn: Connection) -> tuple[str | None, str | None]:
    try:
        done = subprocess.run([flower_bin("flwr"), "ls", conn.federation, "--run-id", run_id, "--format", "json"], env=_flwr_env(conn),
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        text = done.stdout
        runs = json.loads(text[text.find("{"):]).get("runs", [])
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None, None
    if not runs:
        return None, None
    details = str(runs[0].get("status-details") or "")
    return str(runs[0].get("status")), (details if details not in ("", "N/A") else None)


def _stop(proc: subprocess.Popen) -> None:
    """Stop the flwr run child (its process group) by PID."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=5)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
