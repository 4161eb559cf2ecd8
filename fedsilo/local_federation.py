"""A whole federation on one machine, for the demo and end-to-end tests.

Real Flower deployment pieces on loopback: a throw-away CA and server certificate, a
SuperLink with TLS and SuperNode authentication, each silo's key registered with
``flwr supernode register``, one SuperNode per silo whose node config points at its site
folder, and ``flwr run`` of the fedsilo Flower app. Each Flower process gets its own
FLWR_HOME inside the run folder; telemetry and runtime dependency installation are off.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.progress import ROUNDS_FILE, CompletedRounds, read_rows
from coordinator.pki import create_node_key, create_server_tls
from fedsilo.errors import ConfigError, DeploymentError
from fedsilo.flower_app import APP_PYPROJECT, write_flower_app  # noqa: F401 - APP_PYPROJECT: re-exported
from fedsilo.flower_app import flower_bin as _bin
from fedsilo.flower_tuning import superlink_env, tuned_env
from fedsilo.processes import LOOPBACK, ManagedProcess, ProcessSet, flower_env, free_port, port_in_use, run_command

LINK = "fedsilo"
#: Called with a round row (see submit_and_follow).
RowCallback = Callable[[dict[str, Any]], None]
#: How a silo runs its ClientApp per message. "warm": SuperNode ``--isolation process`` beside
#: silo_agent.warm_exec, which forks each message from a process that imported torch once;
#: "subprocess": Flower's default, a fresh ``flwr-clientapp`` (and a fresh torch import) per message.
ISOLATION_MODES = ("warm", "subprocess")



def provision_audit_keys(root: Path, silos: Sequence["SiloSpec"]) -> dict[str, str]:
    """The coordinator's checkpoint key, trusted by every silo; the silos' witness keys, known to the coordinator.

    ``pki/audit/`` holds the coordinator's key pair; ``pki/audit-trust/`` every public key (the
    coordinator's and each silo's witness key): what ``fedsilo audit verify --keys`` needs.
    Returns the run-config entries that tell the ServerApp where the keys are.
    """
    from compliance.keys import generate_signer
    from fedsilo.protocol import COORDINATOR_LOG_KEY
    from silo_agent.witnessing import ensure_witness_key, trust_coordinator, witness_key_name

    audit_keys = root / "pki" / "audit"
    witness_keys = root / "pki" / "audit-trust"
    witness_keys.mkdir(parents=True, exist_ok=True)
    generate_signer(audit_keys, COORDINATOR_LOG_KEY, role="log")
    vkey = audit_keys / f"{COORDINATOR_LOG_KEY}.vkey"
    shutil.copyfile(vkey, witness_keys / vkey.name)
    for spec in silos:
        ensure_witness_key(spec.site_dir, spec.site)
        trust_coordinator(spec.site_dir, vkey)
        name = witness_key_name(spec.site)
        shutil.copyfile(spec.site_dir / "keys" / f"{name}.vkey", witness_keys / f"{name}.vkey")
    return {"audit-key-dir": str(audit_keys.resolve()), "witness-keys-dir": str(witness_keys.resolve())}


@dataclass(frozen=True)
class SiloSpec:
    """One silo of a local federation.

    ``register=False`` leaves its SuperNode key out of the SuperLink's list, as when a hospital's
    enrolment was missed: the SuperLink refuses it, and the start must fail naming that silo.
    """

    site: str
    site_dir: Path
    register: bool = True


class LocalFederation:
    """Start a TLS federation of ``silos`` under ``root``; use as a context manager.

    Args:
        root: the run folder (pki/, flwr/, logs/ are created in it).
        silos: the sites and their site folders.
        superlink_port: the SuperLink's port (0: pick a free one).
        threads_per_silo: torch threads per silo process (silos share this machine's cores).
        isolation: how each silo runs its ClientApp (:data:`ISOLATION_MODES`).
        tuned: poll in tenths of a second instead of Flower's seconds (fedsilo.flower_tuning);
            default: on with the warm executor, off with Flower's subprocess mode.
    """

    def __init__(self, root: Path, silos: Sequence[SiloSpec], *, superlink_port: int = 0, threads_per_silo: int = 1,
                 isolation: str = "warm", tuned: bool | None = None) -> None:
        if isolation not in ISOLATION_MODES:
            raise ConfigError(f"isolation '{isolation}' is not known", fix=f"use one of: {', '.join(ISOLATION_MODES)}")
        if not silos:
            raise ConfigError("a federation needs at least one silo", fix="pass --silos 1 or more")
        for spec in silos:
            if not (spec.site_dir / "site.yaml").is_file():
                raise ConfigError(f"no site folder at {spec.site_dir}", fix="create it with fedsilo silo init")
        if superlink_port and port_in_use(superlink_port):
            raise ConfigError(f"port {superlink_port} is already in use", fix="choose another --port or stop what listens there")
        self.root = root
        self.silos = list(silos)
        self.port = superlink_port or free_port()
        self.threads = threads_per_silo
        self.isolation = isolation
        self.tuned = (isolation == "warm") if tuned is None else tuned
        self.tls = None
        self.logs = root / "logs"
        self.flwr_home = root / "flwr"
        self.procs = ProcessSet(self.logs, flower_env(self.flwr_home / "cli"))
        self.nodes: dict[str, ManagedProcess] = {}
        self.executors: dict[str, ManagedProcess] = {}

    # --- lifecycle --------------------------------------------------------------------

    def __enter__(self) -> "LocalFederation":
        self.procs.__enter__()
        try:
            self._start()
        except BaseException:
            self.procs.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.procs.__exit__(*exc)

    def _start(self) -> None:
        pki = self.root / "pki"
        tls = self.tls = create_server_tls(pki)
        self.audit_config = provision_audit_keys(self.root, self.silos)
        self.audit_config["node-keys-dir"] = str((pki / "nodes").resolve())  # each node's site is its key's (made below)
        self._write_cli_config(tls.ca_cert)
        # Tuned, the SuperLink holds empty pulls until something is pushed (fedsilo.flower_longpoll).
        launcher = [sys.executable, "-m", "fedsilo.flower_tuning", "flower-superlink"] if self.tuned else [_bin("flower-superlink")]
        superlink = self.procs.start("superlink", [
            *launcher, "--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key),
            "--enable-supernode-auth", "--host", LOOPBACK, "--port", str(self.port), "--database", str(self.root / "flwr" / "superlink-state.db"),
            "--disable-runtime-dependency-installation",
        ], env=self._env(self.flwr_home / "superlink", superlink=True))
        self.procs.wait_for_port(superlink, self.port)
        cli_env = self.procs.env  # the flwr CLI's home holds the connection config
        for spec in self.silos:
            key = create_node_key(pki / "nodes", spec.site)
            if spec.register:
                self._register(key.public_key, spec.site, cli_env)
            self.start_silo(spec.site)
        self._wait_online(cli_env)

    def start_silo(self, site: str, *, rejoin_timeout_s: float = 0.0) -> ManagedProcess:
        """Start (or restart) ``site``'s SuperNode with its key, and its warm executor in "warm" mode.

        After a crash the SuperLink still counts the silo's key as active until its heartbeats lapse,
        and refuses it (Flower exit code 305); with ``rejoin_timeout_s`` the start is retried until the
        silo is accepted or the time is up, as a hospital's service manager would.
        """
        deadline = time.monotonic() + rejoin_timeout_s
        while True:
            node = self._start_node(site)
            if self._activated(node) or time.monotonic() > deadline:
                break
            self.procs.finish(node)
            time.sleep(2.0)
        if not node.alive():
            raise DeploymentError(f"silo {site} failed to start: its SuperNode exited with code {node.popen.returncode} ({node.log_tail(2)})",
                                  fix=f"read {node.log_path}; after a crash the coordinator accepts the silo again once its heartbeats lapse")
        self.nodes[site] = node
        if self.isolation == "warm":
            # The Runtime API is the SuperNode's loopback port: "--insecure" is that local hop only.
            env = self._env(self.flwr_home / site)
            self.executors[site] = self.procs.start(f"executor-{site}", [
                sys.executable, "-m", "silo_agent.warm_exec", "--insecure", "--runtime-api-address", f"{LOOPBACK}:{node.port}",
                "--parent-pid", str(node.pid),
            ], env=env)
        return node

    def _start_node(self, site: str) -> ManagedProcess:
        spec = next(s for s in self.silos if s.site == site)
        key = self.root / "pki" / "nodes" / f"{site}.key"
        node_port = free_port()
        node_config = f"site-dir='{spec.site_dir.resolve()}' threads={self.threads}"
        isolation = ["--isolation", "process"] if self.isolation == "warm" else []
        launcher = [sys.executable, "-m", "fedsilo.flower_tuning", "flower-supernode"] if self.tuned else [_bin("flower-supernode")]
        node = self.procs.start(f"supernode-{site}", [
            *launcher, "--root-certificates", str(self.tls.ca_cert), "--superlink", f"{LOOPBACK}:{self.port}",
            "--auth-supernode-private-key", str(key), "--host", LOOPBACK, "--port", str(node_port),
            "--node-config", node_config, *isolation,
        ], env=self._env(self.flwr_home / spec.site))
        self.procs.wait_for_port(node, node_port)
        node.port = node_port
        return node

    @staticmethod
    def _activated(node: ManagedProcess, timeout_s: float = 60.0) -> bool:
        """Whether the SuperLink accepted the SuperNode (it logs its node id), rather than refusing it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if "SuperNode ID:" in node.output():
                return True
            if not node.alive():
                return False
            time.sleep(0.2)
        return node.alive()

    def _env(self, flwr_home: Path, *, superlink: bool = False) -> dict[str, str]:
        env = flower_env(flwr_home)
        if not self.tuned:
            return env
        return superlink_env(env) if superlink else tuned_env(env)

    def stop_silo(self, site: str, *, kill: bool = False) -> None:
        """Stop ``site``'s SuperNode (and executor) by PID: SIGTERM, or SIGKILL with ``kill`` (a crash)."""
        for procs in (self.executors, self.nodes):
            proc = procs.pop(site, None)
            if proc is not None:
                self.procs.finish(proc, kill=kill)

    def _wait_online(self, env: dict[str, str], timeout_s: float = 90.0) -> None:
        """Wait until every silo's SuperNode has authenticated to the SuperLink.

        A SuperNode that cannot join (an unregistered key is refused, exit 305) fails the start,
        naming the silo, instead of leaving a federation with a silo missing.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            for site, node in self.nodes.items():
                if not node.alive():
                    raise DeploymentError(f"silo {site} failed to start: its SuperNode exited with code {node.popen.returncode} ({node.log_tail(2)})",
                                          fix=f"read {node.log_path}; check the silo's key is registered and its site folder is readable")
            listing = json.loads(run_command([_bin("flwr"), "supernode", "ls", LINK, "--format", "json"], env=env, what="list silos") or "{}")
            online = sum(1 for n in listing.get("nodes", []) if n.get("status") == "online")
            if online >= len(self.nodes):
                return
            if time.monotonic() > deadline:
                raise DeploymentError(f"{online} of {len(self.nodes)} silos came online within {timeout_s:.0f} s", fix=f"read the supernode logs in {self.logs}")
            time.sleep(1.0)

    def _register(self, public_key: Path, site: str, env: dict[str, str]) -> None:
        # The Control API may need a moment after the port opens: retry briefly.
        for attempt in range(10):
            try:
                run_command([_bin("flwr"), "supernode", "register", str(public_key), LINK, "--name", site], env=env, what=f"register silo {site}")
                return
            except DeploymentError:
                if attempt == 9:
                    raise
                time.sleep(1.0)

    def _write_cli_config(self, ca_cert: Path) -> None:
        home = self.flwr_home / "cli"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{LINK}"\n\n[superlink.{LINK}]\naddress = "{LOOPBACK}:{self.port}"\nroot-certificates = "{ca_cert.resolve()}"\n',
            encoding="utf-8",
        )

    # --- running a plan ---------------------------------------------------------------

    def run_plan(self, plan_path: Path, out_dir: Path, *, on_round: RowCallback | None = None, on_evaluated: RowCallback | None = None,
                 timeout_s: float = 3600.0) -> None:
        """Submit the plan with ``flwr run --stream`` and follow its rounds until it ends (callbacks: submit_and_follow)."""
        submit_and_follow(self.procs, self.root, plan_path, out_dir, LINK, run_config_extra=self.audit_config,
                          on_round=on_round, on_evaluated=on_evaluated, timeout_s=timeout_s)

    def resume_run(self, run_dir: Path, *, on_round: RowCallback | None = None, on_evaluated: RowCallback | None = None,
                   timeout_s: float = 3600.0) -> None:
        """Continue an interrupted run from its last completed round (what ``fedsilo plan resume`` does)."""
        submit_and_follow(self.procs, self.root, None, run_dir, LINK, run_config_extra={**self.audit_config, "resume-from": str(run_dir.resolve())},
                          on_round=on_round, on_evaluated=on_evaluated, timeout_s=timeout_s)

    def serverapp_pids(self) -> list[int]:
        """PIDs of the ServerApp processes the SuperLink runs now (a test stops one to stage a coordinator crash)."""
        from fedsilo.processes import descendant_pids

        superlink = next(p for p in self.procs.processes if p.name == "superlink")
        pids = []
        for pid in descendant_pids(superlink.pid):
            try:
                cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes()
            except OSError:
                continue
            if b"flwr-serverapp" in cmdline:
                pids.append(pid)
        return pids


def submit_and_follow(procs: ProcessSet, root: Path, plan_path: Path | None, out_dir: Path, link: str, *,
                      run_config_extra: dict[str, str] | None = None, flwr_args: Sequence[str] = (),
                      on_round: RowCallback | None = None, on_evaluated: RowCallback | None = None, timeout_s: float = 3600.0) -> None:
    """``flwr run`` the fedsilo app on ``link`` and follow the ServerApp's round rows until the run ends.

    The ServerApp appends one JSON row per round to ``out_dir/logs/rounds.jsonl`` at the end of the round's
    training, passed to ``on_round`` then; a plain round's evaluation comes in the next round (an ``evaluated``
    line), and is merged into the same row object. ``on_evaluated`` gets each round's row once it is complete
    (coordinator.progress.CompletedRounds). A failed run, a dead process or the timeout raise DeploymentError.
    """
    app_dir = write_flower_app(root / "flwr" / "app")
    run_config = root / "flwr" / "run-config.toml"
    values = {"out-dir": str(out_dir.resolve()), **(run_config_extra or {})}
    if plan_path is not None:
        values["plan-path"] = str(plan_path.resolve())
    run_config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()), encoding="utf-8")
    rounds_file = out_dir / "logs" / ROUNDS_FILE
    if plan_path is not None:
        rounds_file.unlink(missing_ok=True)
    earlier = read_rows(rounds_file)  # a resumed run appends to the rows of the rounds before it
    runner = procs.start("flwr-run", [_bin("flwr"), "run", str(app_dir), link, "--run-config", str(run_config), "--stream", *flwr_args])
    try:
        _follow(procs, runner, rounds_file, out_dir, on_round, on_evaluated, timeout_s, earlier=earlier)
    finally:
        procs.finish(runner)  # the federation stays up for the next run, whatever became of this one


def _follow(procs: ProcessSet, runner, rounds_file: Path, out_dir: Path, on_round, on_evaluated, timeout_s: float, *,
            earlier: Sequence[dict[str, Any]] = ()) -> None:
    deadline = time.monotonic() + timeout_s
    completed = CompletedRounds()
    for row in earlier:  # a resumed run: the rounds before it (one may still wait for its evaluation)
        completed.add(row)
    seen = len(earlier)
    while True:
        rows = read_rows(rounds_file)
        for row in rows[seen:]:
            if row.get("event") == "round" and on_round:
                on_round(row)
            for done in completed.add(row):
                if on_evaluated:
                    on_evaluated(done)
            if row.get("event") == "failed":
                raise DeploymentError(f"the run failed: {row.get('reason')}", fix=f"read {out_dir / 'audit'} with fedsilo audit show, and {procs.logs_dir}")
            if row.get("event") == "finished":
                return
        seen = len(rows)
        procs.check_alive()
        if not runner.alive():
            # flwr run returned: the run ended; give the last rows a moment to land.
            time.sleep(0.5)
            if read_rows(rounds_file)[seen:]:
                continue
            raise DeploymentError(f"the run ended without finishing (flwr run exit {runner.popen.returncode}): {runner.log_tail()}",
                                  fix=f"read {runner.log_path} and {procs.logs_dir}")
        if time.monotonic() > deadline:
            raise DeploymentError(f"the run did not finish within {timeout_s:.0f} s", fix=f"read {procs.logs_dir}")
        time.sleep(0.5)


