"""``fedsilo coordinator start|status|renew-cert|rotate-audit-key``: the federation's SuperLink, run from a coordinator kit.

``start`` runs ``flower-superlink`` as a managed child in the foreground: TLS with the kit's server
certificate, SuperNode authentication with every site's node public key registered through the Control
API (``flwr supernode register``), a persistent state database, and ``FEDSILO_COORDINATOR_DIR`` set to
the kit folder so each ServerApp finds its run folder (``runs/<run id>``), its checkpoint key
(``audit-keys/``) and the sites' witness keys (``audit-trust/``) there. It stays up until SIGINT or
SIGTERM, then stops the SuperLink (and the ServerApps it started) by PID.

The kit folder is the coordinator's home::

    coordinator.yaml  ca.crt  server.pem  server.key  sites/<site>.pub  audit-keys/  audit-trust/   (from provision)
    superlink-state.db   Flower's state: registered nodes, runs
    nodes.json           site -> Flower node id, recorded at registration (Flower lists nodes by id only)
    runs/<run id>/       each run's folder (model, metrics, audit log)
    flwr/                FLWR_HOME of the SuperLink and of the operator's flwr commands (config.toml)
    logs/                superlink.log

Without TLS material the coordinator refuses to start; ``--insecure-dev`` runs without TLS and says so
loudly, for a development machine only.
"""

from __future__ import annotations

import json
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from coordinator import pki
from coordinator.provision import COORDINATOR_KIT_FILE, COORDINATOR_KIT_FORMAT, NAME_RE
from fedsilo.errors import ConfigError, DeploymentError
from fedsilo.flower_app import flower_bin, toml_string
from fedsilo.flower_tuning import superlink_env
from fedsilo.processes import ManagedProcess, ProcessSet, flower_env, port_in_use, run_command

#: Set for the SuperLink (and inherited by its ServerApps): the coordinator's state folder (coordinator.server_app).
COORDINATOR_DIR_ENV = "FEDSILO_COORDINATOR_DIR"
#: Set to "0" for the ServerApps of a coordinator started with --insecure-dev: its SuperNodes authenticate with
#: random keys, not the kit's, so no node could be told by its key (coordinator.server_app.run_settings).
NODE_AUTH_ENV = "FEDSILO_NODE_AUTH"
NODES_FILE = "nodes.json"
DATABASE = "superlink-state.db"
ALL_INTERFACES = ("0.0.0.0", "::", "")
INSECURE_WARNING = ("WARNING: --insecure-dev: NO TLS and NO SuperNode authentication (Flower requires TLS for it): model "
                    "updates and plans cross the network in clear text, and any host that reaches the port can join as a silo. "
                    "Use this on a development machine only, never with real data.")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class CoordinatorKit:
    root: Path
    federation: str
    addresses: tuple[str, ...]
    port: int
    sites: tuple[str, ...]

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.root / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.root / "server.key"

    @property
    def flwr_cli_home(self) -> Path:
        return self.root / "flwr" / "cli"

    def node_public_key(self, site: str) -> Path:
        return self.root / "sites" / f"{site}.pub"

    def nodes(self) -> dict[str, int]:
        """site -> Flower node id, as recorded when the sites were registered."""
        path = self.root / NODES_FILE
        if not path.is_file():
            return {}
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            return {str(k): int(v) for k, v in raw.items()}
        except (ValueError, AttributeError, TypeError):
            raise ConfigError(f"{path} is damaged", fix=f"delete it; the next 'fedsilo coordinator start' records the node ids again") from None


def load_coordinator_kit(root: Path) -> CoordinatorKit:
    """Read and check a coordinator kit folder (as written by ``fedsilo provision``)."""
    path = root / COORDINATOR_KIT_FILE
    if not path.is_file():
        raise ConfigError(f"{root} is not a coordinator kit ({COORDINATOR_KIT_FILE} missing)",
                          fix="give KITS/coordinator as written by 'fedsilo provision PROJECT.yaml --out KITS'")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        raise ConfigError(f"{path} is not valid YAML", fix="restore it from the kit") from None
    if not isinstance(raw, dict) or raw.get("format") != COORDINATOR_KIT_FORMAT:
        raise ConfigError(f"{path} is not a {COORDINATOR_KIT_FORMAT} file", fix="restore it from the kit, or provision again")
    try:
        kit = CoordinatorKit(root=root.resolve(), federation=str(raw["federation"]), addresses=tuple(str(a) for a in raw["addresses"]),
                             port=int(raw["port"]), sites=tuple(str(s) for s in raw["sites"]))
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{path} lacks federation, addresses, port or sites", fix="restore it from the kit") from None
    if not NAME_RE.match(kit.federation) or not all(NAME_RE.match(s) for s in kit.sites):
        raise ConfigError(f"{path} holds a federation or site name that is not allowed", fix="restore it from the kit")
    return kit


def connect_host(host: str) -> str:
    """Where this machine's own commands reach a SuperLink listening on ``host``."""
    return "127.0.0.1" if host in ALL_INTERFACES or host == "localhost" else host


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def write_cli_config(kit: CoordinatorKit, host: str, port: int, *, insecure: bool) -> Path:
    """``flwr/cli/config.toml``: the connection the operator's flwr commands (and ``status``) use."""
    home = kit.flwr_cli_home
    home.mkdir(parents=True, exist_ok=True)
    name = kit.federation
    security = "insecure = true\n" if insecure else f"root-certificates = {toml_string(str(kit.ca_cert))}\n"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = {toml_string(_hostport(connect_host(host), port))}\n{security}',
        encoding="utf-8")
    return home


def check_tls(kit: CoordinatorKit, *, report: Callable[[str], None] = say) -> None:
    """Refuse to start without the TLS files; warn about a certificate that expires within 30 days."""
    missing = [p.name for p in (kit.ca_cert, kit.server_cert, kit.server_key) if not p.is_file()]
    if missing:
        raise ConfigError(f"the coordinator kit {kit.root} has no {', '.join(missing)}: refusing to run without TLS",
                          fix="restore them from the kit or issue new ones (fedsilo coordinator renew-cert); "
                              "--insecure-dev runs without TLS on a development machine only")
    pki.check_private_mode(kit.server_key)
    for what, path in (("CA certificate", kit.ca_cert), ("server certificate", kit.server_cert)):
        warning = pki.expiry_warning(path, what)
        if warning:
            report(warning)


def _wait_listening(proc: ManagedProcess, host: str, port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    target = connect_host(host)
    while time.monotonic() < deadline:
        if not proc.alive():
            raise DeploymentError(f"the SuperLink exited with code {proc.popen.returncode} before listening on port {port}: {proc.log_tail()}",
                                  fix=f"read {proc.log_path}")
        try:
            with socket.create_connection((target, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise DeploymentError(f"the SuperLink did not listen on port {port} within {timeout_s:.0f} s", fix=f"read {proc.log_path}")


def _flwr_json(argv: list[str], env: dict[str, str], what: str) -> dict[str, Any]:
    """A ``flwr ... --format json`` command's answer; Flower reports some failures with exit 0 and success false."""
    text = run_command([flower_bin("flwr"), *argv, "--format", "json"], env=env, what=what)
    start = text.find("{")
    try:
        answer = json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        raise DeploymentError(f"cannot {what}: Flower's answer is not JSON", fix="check that fedsilo and Flower versions match") from None
    return answer


def register_sites(kit: CoordinatorKit, env: dict[str, str], *, retries: int = 10) -> dict[str, int]:
    """Register every site's node public key with the SuperLink; returns site -> node id (also kept in nodes.json).

    A key the SuperLink already holds (a restart on the same database) keeps its recorded node id.
    """
    nodes = kit.nodes()
    for site in kit.sites:
        pub = kit.node_public_key(site)
        fingerprint = pki.node_key_fingerprint(pub)  # refuses a missing or malformed key before Flower sees it
        for attempt in range(retries):
            try:
                answer = _flwr_json(["supernode", "register", str(pub), kit.federation, "--name", site], env, f"register site {site}")
                break
            except DeploymentError:  # the Control API may need a moment after the port opens
                if attempt == retries - 1:
                    raise
                time.sleep(1.0)
        if answer.get("success"):
            nodes[site] = int(answer["node-id"])
            say(f"registered site {site} (node key {fingerprint[:23]}...)")
        elif "already in use" in str(answer.get("error-message", "")):
            say(f"site {site} was registered before (node key {fingerprint[:23]}...)")
        else:
            reason = " ".join(str(answer.get("error-message", "no answer")).split())[-200:]
            raise DeploymentError(f"cannot register site {site}: {reason}", fix=f"check {pub} and the SuperLink log")
    (kit.root / NODES_FILE).write_text(json.dumps(nodes, indent=2) + "\n", encoding="utf-8")
    return nodes


def run_coordinator(kit: CoordinatorKit, *, host: str = "0.0.0.0", port: int | None = None, insecure_dev: bool = False,
                    on_ready: Callable[[], None] | None = None) -> None:
    """Run the SuperLink from ``kit`` until SIGINT/SIGTERM (raised here as KeyboardInterrupt) or until it dies.

    Raises:
        ConfigError: no TLS material (without ``insecure_dev``), an expired certificate, the port in use.
        DeploymentError: the SuperLink would not start, a site could not be registered, or it stopped.
    """
    port = port or kit.port
    if insecure_dev:
        for _ in range(2):
            say(INSECURE_WARNING)
    else:
        check_tls(kit)
    if port_in_use(port, connect_host(host) if host not in ALL_INTERFACES else "0.0.0.0"):
        raise ConfigError(f"port {port} is already in use", fix="stop what listens there (another coordinator?) or pass --port")
    tls = ["--insecure"] if insecure_dev else ["--ssl-ca-certfile", str(kit.ca_cert), "--ssl-certfile", str(kit.server_cert),
                                               "--ssl-keyfile", str(kit.server_key)]
    (kit.root / "runs").mkdir(exist_ok=True)
    cli_home = write_cli_config(kit, host, port, insecure=insecure_dev)
    # Flower's polling tuned for a handful of nodes (fedsilo.flower_tuning): the ServerApps poll in tenths of a second, the
    # SuperExec that launches them every second, and the SuperLink holds empty pulls until something is pushed
    # (fedsilo.flower_longpoll).
    link_env = superlink_env(flower_env(kit.root / "flwr" / "superlink"))
    link_env[COORDINATOR_DIR_ENV] = str(kit.root)
    link_env[NODE_AUTH_ENV] = "0" if insecure_dev else "1"
    with ProcessSet(kit.root / "logs", flower_env(cli_home)) as procs:
        auth = [] if insecure_dev else ["--enable-supernode-auth"]
        superlink = procs.start("superlink", [
            sys.executable, "-m", "fedsilo.flower_tuning", "flower-superlink", *tls, *auth, "--host", host, "--port", str(port),
            "--database", str(kit.root / DATABASE), "--disable-runtime-dependency-installation",
        ], env=link_env)
        _wait_listening(superlink, host, port)
        if insecure_dev:
            mode = "NO TLS and NO SuperNode authentication (--insecure-dev)"
        else:
            register_sites(kit, procs.env)
            mode = f"TLS, SuperNode authentication, {len(kit.sites)} site(s) registered"
        say(f"coordinator of federation {kit.federation} listening on {_hostport(host or '0.0.0.0', port)} ({mode}); "
            f"state in {kit.root}; Ctrl-C stops it")
        if on_ready:
            on_ready()
        while True:
            if not superlink.alive():
                raise DeploymentError(f"the SuperLink stopped with exit code {superlink.popen.returncode}: {superlink.log_tail()}",
                                      fix=f"read {superlink.log_path}")
            time.sleep(1.0)


# --- status -----------------------------------------------------------------------------------------------


def coordinator_status(kit: CoordinatorKit) -> dict[str, Any]:
    """Sites (registered, online or offline) and runs, from the running SuperLink's Control API."""
    home = kit.flwr_cli_home
    if not (home / "config.toml").is_file():
        raise ConfigError(f"the coordinator has not been started from {kit.root}", fix=f"start it: fedsilo coordinator start --kit {kit.root}")
    env = flower_env(home)
    try:
        listing = _flwr_json(["supernode", "ls", kit.federation], env, "list the sites")
        runs = _flwr_json(["ls", kit.federation], env, "list the runs")
    except DeploymentError as exc:
        raise DeploymentError(f"cannot reach the coordinator's SuperLink: {exc.message}",
                              fix=f"is it running? start it with: fedsilo coordinator start --kit {kit.root}") from None
    for answer in (listing, runs):
        if not answer.get("success"):
            reason = " ".join(str(answer.get("error-message", "no answer")).split())[-200:]
            raise DeploymentError(f"cannot reach the coordinator's SuperLink: {reason}",
                                  fix=f"is it running? start it with: fedsilo coordinator start --kit {kit.root}")
    by_id = {node_id: site for site, node_id in kit.nodes().items()}
    sites = []
    for node in listing.get("nodes", []):
        node_id = int(node["node-id"])
        sites.append({"site": by_id.get(node_id), "node_id": node_id, "status": node.get("status"),
                      "online_at": node.get("online-at"), "offline_at": node.get("offline-at")})
    listed = {s["site"] for s in sites}
    for site in kit.sites:
        if site not in listed:
            sites.append({"site": site, "node_id": kit.nodes().get(site), "status": "not registered", "online_at": None, "offline_at": None})
    run_rows = [{"run_id": str(r.get("run-id")), "status": r.get("status"), "elapsed_s": r.get("elapsed"),
                 "started": r.get("running-at") or r.get("pending-at"), "finished": r.get("finished-at")} for r in runs.get("runs", [])]
    return {"federation": kit.federation, "sites": sorted(sites, key=lambda s: (s["site"] is None, s["site"] or "")), "runs": run_rows,
            "online": sum(1 for s in sites if s["status"] == "online" and s["site"]),
            "unknown_online": sum(1 for s in sites if s["status"] == "online" and not s["site"])}


def format_status(status: dict[str, Any]) -> str:
    """The status as two short tables."""
    lines = [f"federation {status['federation']}: {status['online']} of {sum(1 for s in status['sites'] if s['site'])} site(s) online"
             + (f"; {status['unknown_online']} node(s) online that this kit did not register (UNKNOWN NODE below)" if status["unknown_online"] else "")]
    lines.append(f"{'site':<20} {'status':<15} {'node id':<21} since")
    for s in status["sites"]:
        name = s["site"] or "UNKNOWN NODE"  # registered, but not by this kit: check who registered it
        since = s["online_at"] if s["status"] == "online" else (s["offline_at"] if s["status"] == "offline" else "")
        lines.append(f"{name:<20} {str(s['status']):<15} {str(s['node_id'] or '-'):<21} {since or ''}".rstrip())
    lines.append("")
    if status["runs"]:
        lines.append(f"{'run id':<21} {'status':<20} {'elapsed':>9}  started")
        for r in status["runs"]:
            elapsed = r["elapsed_s"]
            elapsed_text = f"{float(elapsed):.0f} s" if isinstance(elapsed, (int, float)) else "-"
            lines.append(f"{r['run_id']:<21} {str(r['status']):<20} {elapsed_text:>9}  {r['started'] or '-'}")
    else:
        lines.append("no runs yet")
    return "\n".join(lines)


# --- rotation -------------------------------------------------------------------------------------------


def renew_server_certificate(kit: CoordinatorKit, ca_dir: Path, *, days: int = 365) -> str:
    """Issue a new server certificate (and key) for the kit's addresses with the federation's CA; returns its fingerprint.

    The sites trust the CA, not this certificate, so they need nothing new. Restart the coordinator to use it.
    """
    from coordinator.provision import LOOPBACK_NAMES

    ca = pki.load_ca(ca_dir / "ca.crt", ca_dir / "ca.key")
    if kit.ca_cert.is_file() and pki.certificate_fingerprint(kit.ca_cert) != pki.certificate_fingerprint(ca.cert_path):
        raise ConfigError(f"{ca_dir} is not the CA of {kit.root}", fix="give the ca/ folder provisioned with this coordinator kit")
    for name in ("server.pem", "server.key"):
        old = kit.root / name
        if old.exists():
            old.replace(old.with_name(name + ".old"))
    pki.issue_server_cert(ca, kit.server_cert, kit.server_key, hosts=tuple(dict.fromkeys((*kit.addresses, *LOOPBACK_NAMES))), days=days)
    return pki.certificate_fingerprint(kit.server_cert)


@dataclass(frozen=True)
class Rotation:
    """What ``rotate-audit-key`` did: the old and new key fingerprints, the public key file for the sites, and
    whether it finished a rotation that had been interrupted (then nothing new was made)."""

    old: str
    new: str
    shared: Path
    finished_interrupted: bool = False


def rotate_audit_key(kit: CoordinatorKit) -> Rotation:
    """Replace the coordinator's checkpoint key (``audit-keys/``) with a new Ed25519 key.

    The new pair is made in ``audit-keys.new/`` and swapped in by renaming folders, so ``audit-keys/`` always
    holds a matching pair; the old folder, private key included, is then deleted. The old public key stays in
    ``audit-trust/`` as ``<key>-<fingerprint>.vkey``: ``fedsilo audit verify --keys audit-trust`` checks runs
    signed by either key. A run in progress keeps signing with the key it started with; new runs use the new
    one. Each site trusts the new key once its kit's ``trust/`` holds it and its node restarts (``fedsilo silo
    start`` keeps the old key beside it, so a site still accepts the old key's checkpoints until that copy is
    deleted: after a suspected leak, delete it); until then a site refuses the requests whose checkpoints the
    new key signs. Run again after an interruption, the command finishes the interrupted rotation."""
    from compliance.keys import generate_signer, key_stem, load_signer
    from fedsilo.protocol import COORDINATOR_LOG_KEY

    keys, trust = kit.root / "audit-keys", kit.root / "audit-trust"
    fresh, retired = kit.root / "audit-keys.new", kit.root / "audit-keys.old"
    stem = key_stem(COORDINATOR_LOG_KEY)
    try:
        previous = _published_key(trust, stem)
        finished = _finish_interrupted_rotation(keys, fresh, retired)
        if not (keys / f"{stem}.key").is_file() or not (keys / f"{stem}.vkey").is_file():
            raise ConfigError(f"{kit.root} has no checkpoint key audit-keys/{stem}.key and .vkey to rotate",
                              fix="restore audit-keys/ from the kit made by 'fedsilo provision'")
        current = load_signer(keys, COORDINATOR_LOG_KEY).verifier  # a matching pair, or a one-line error
        if finished or (previous is not None and previous != current):  # swapped, but audit-trust/ not yet told
            old = previous if previous is not None and previous != current else current
            _publish(trust, stem, old, current)
            return Rotation(old.fingerprint, current.fingerprint, trust / f"{stem}.vkey", finished_interrupted=True)
        # Before anything moves, audit-trust/ names the current key and keeps it under its fingerprint: the runs it
        # signed verify whatever happens next.
        _write_vkey(trust / f"{stem}.vkey", current)
        _keep(trust, stem, current)
        new = generate_signer(fresh, COORDINATOR_LOG_KEY, role="log").verifier
        keys.replace(retired)
        fresh.replace(keys)
        shutil.rmtree(retired)  # the old private key is gone from here on
        _publish(trust, stem, current, new)
        return Rotation(current.fingerprint, new.fingerprint, trust / f"{stem}.vkey")
    except OSError as exc:
        raise ConfigError(f"cannot rotate the checkpoint key in {kit.root} ({exc.strerror or type(exc).__name__})",
                          fix="fix the folder's permissions or space, then run 'fedsilo coordinator rotate-audit-key' again to finish") from None


def _finish_interrupted_rotation(keys: Path, fresh: Path, retired: Path) -> bool:
    """Complete or undo what an interrupted rotation left; whether it had swapped the keys already."""
    if retired.exists():
        if not keys.exists():  # stopped between the two renames: the new pair is in fresh
            fresh.replace(keys)
        shutil.rmtree(retired)
        return True
    if fresh.exists():  # stopped before the swap: the half-made pair was never used
        shutil.rmtree(fresh)
    return False


def _published_key(trust: Path, stem: str):
    """The checkpoint key ``audit-trust/`` names as the current one, if any."""
    from compliance.keys import read_vkey_file

    path = trust / f"{stem}.vkey"
    return read_vkey_file(path) if path.is_file() else None


def _publish(trust: Path, stem: str, old, new) -> None:
    """``audit-trust/``: the old public key kept under its fingerprint, the new one as the current key."""
    if old != new:
        _keep(trust, stem, old)
    _write_vkey(trust / f"{stem}.vkey", new)


def _keep(trust: Path, stem: str, key) -> None:
    _write_vkey(trust / f"{stem}-{key.fingerprint.split(':')[-1][:12]}.vkey", key)


def _write_vkey(path: Path, key) -> None:
    """Write a public key file through a temporary file and a rename: never a half-written key."""
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(key.vkey() + "\n", encoding="ascii")
    tmp.replace(path)
