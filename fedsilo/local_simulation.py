"""The same fedsilo run in Flower's simulation engine (Ray), for quick experiments on one machine.

One SuperLink in simulation mode runs the ServerApp and N virtual SuperNodes; virtual node i
(``partition-id`` i) serves the i-th site folder, passed in the run config as ``site-dirs``.
There is no network between silos here, so no TLS or node authentication: use the deployment
engine (:mod:`fedsilo.local_federation`) for anything that should look like hospitals.
Needs the optional extra: ``pip install -e '.[simulation]'``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedsilo.errors import ConfigError
from fedsilo.local_federation import SiloSpec, _bin, provision_audit_keys, submit_and_follow
from fedsilo.processes import LOOPBACK, ProcessSet, flower_env, free_port

LINK = "fedsilo-sim"


class LocalSimulation:
    """Start a simulation-mode SuperLink under ``root``; use as a context manager."""

    def __init__(self, root: Path, silos: Sequence[SiloSpec], *, port: int = 0) -> None:
        if importlib.util.find_spec("ray") is None:
            raise ConfigError("the simulation engine needs Flower's 'simulation' extra (Ray), which is not installed",
                              fix=".venv/bin/pip install -e '.[simulation]', or use --engine deployment")
        if not silos:
            raise ConfigError("a federation needs at least one silo", fix="pass --silos 1 or more")
        self.root = root
        self.silos = list(silos)
        self.port = port or free_port()
        self.logs = root / "logs"
        home = root / "flwr" / "cli"
        home.mkdir(parents=True, exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{LINK}"\n\n[superlink.{LINK}]\naddress = "{LOOPBACK}:{self.port}"\ninsecure = true\n', encoding="utf-8")
        env = flower_env(home)
        # Ray puts AF_UNIX sockets under RAY_TMPDIR, whose paths may not exceed 107 bytes: a run
        # folder is often deeper than that allows, so Ray gets a short private folder instead.
        self.ray_tmp = Path(tempfile.mkdtemp(prefix="fedsilo-ray-", dir="/tmp" if os.path.isdir("/tmp") else None))
        env["RAY_TMPDIR"] = str(self.ray_tmp)
        self.procs = ProcessSet(self.logs, env)

    def __enter__(self) -> "LocalSimulation":
        self.procs.__enter__()
        try:
            link = self.procs.start("superlink", [
                _bin("flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess", "--host", LOOPBACK,
                "--port", str(self.port), "--database", str(self.root / "flwr" / "superlink-state.db"),
                "--disable-runtime-dependency-installation",
            ])
            self.procs.wait_for_port(link, self.port)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.procs.__exit__(*exc)
        finally:
            shutil.rmtree(self.ray_tmp, ignore_errors=True)

    def run_plan(self, plan_path: Path, out_dir: Path, *, on_round: Callable[[dict[str, Any]], None] | None = None,
                 on_evaluated: Callable[[dict[str, Any]], None] | None = None, timeout_s: float = 3600.0) -> None:
        site_dirs = os.pathsep.join(str(s.site_dir.resolve()) for s in self.silos)
        extra = {"site-dirs": site_dirs, **provision_audit_keys(self.root, self.silos)}
        submit_and_follow(self.procs, self.root, plan_path, out_dir, LINK, run_config_extra=extra,
                          flwr_args=["--federation-config", f"num-supernodes={len(self.silos)}"], on_round=on_round,
                          on_evaluated=on_evaluated, timeout_s=timeout_s)
