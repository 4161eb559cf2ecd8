"""``fedsilo silo start``: the hospital's SuperNode, run from its site kit.

The kit (``fedsilo provision``) holds the federation's CA certificate, this site's SuperNode key pair
(EC P-384, OpenSSH), its witness key, the coordinator's checkpoint public key, the officers' keys and
``site-kit.yaml`` (site id, coordinator address). ``start``:

1. sets up the site folder from the kit if needed (site id; the witness key in ``keys/``; the coordinator's
   key in ``trust/``; the officers' keys in ``officers/``), and refuses a folder that belongs to another
   site or already holds another witness key;
2. runs ``flower-supernode`` in the foreground: TLS to the coordinator with the kit's CA, authenticated
   with the node key, node config ``site-dir`` pointing at the site folder. The silo only dials out;
   its own port (the ClientApp's Runtime API) listens on 127.0.0.1. With ``--isolation warm`` (default)
   the ClientApp runs through :mod:`silo_agent.warm_exec` (torch imported once per silo, not per message);
3. stops it (and its helpers) by PID on SIGINT/SIGTERM. A coordinator that refuses the node key
   (not registered: Flower's SuperNode exits with code 305) is reported as such.

``--insecure-dev`` runs without TLS (loudly), for a development machine only. Before Flower connects, a
TLS handshake with the coordinator checks its certificate against the kit's CA (a mismatch is named
plainly); the CA's or the coordinator's certificate expiring within 30 days gives a warning.

Run it as ``fedsilo silo start --kit DIR --site-dir SITE_DIR`` or ``python -m silo_agent.node --kit DIR --site-dir SITE_DIR``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import socket
import stat
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from compliance.keys import key_stem, read_vkey_file
from compliance.records import EventType
from fedsilo.errors import ConfigError, DeploymentError, FedsiloError
from fedsilo.flower_app import flower_bin
from fedsilo.flower_tuning import tuned_env
from fedsilo.processes import LOOPBACK, ManagedProcess, ProcessSet, flower_env, free_port, port_in_use
from fedsilo.protocol import COORDINATOR_LOG_KEY
from silo_agent.site import NAME_RE, SITE_FILE, Site, audit_site, init_site
from silo_agent.witnessing import trust_coordinator, witness_key_name

SITE_KIT_FORMAT = "fedsilo-site-kit/v1"  # coordinator.provision.SITE_KIT_FORMAT
SITE_KIT_FILE = "site-kit.yaml"
ISOLATION = ("warm", "subprocess")
#: Flower's exit code for a SuperNode the SuperLink will not activate (1.42: its key is not registered).
EXIT_NODE_REFUSED = 305
REJOIN_RETRY_S = 5.0
ACCEPTED_MARK = "accepted-by-coordinator"  # in SITE_DIR/flwr: the coordinator has accepted this site's node before
EXPIRY_WARNING_DAYS = 30
INSECURE_WARNING = ("WARNING: --insecure-dev: NO TLS to the coordinator and no node authentication (Flower requires TLS for it): "
                    "model updates and plans cross the network in clear text and the coordinator is not authenticated. Use this "
                    "on a development machine only, never with real data.")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class SiteKit:
    root: Path
    federation: str
    site: str
    coordinator: str  # HOST:PORT the SuperNode dials
    officers: tuple[str, ...]

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def node_key(self) -> Path:
        return self.root / "node.key"

    @property
    def witness_dir(self) -> Path:
        return self.root / "witness"


def load_site_kit(root: Path) -> SiteKit:
    """Read and check a site kit folder written by ``fedsilo provision``."""
    path = root / SITE_KIT_FILE
    if not path.is_file():
        raise ConfigError(f"{root} is not a site kit ({SITE_KIT_FILE} missing)", fix="give KITS/<site> as written by 'fedsilo provision'")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        raise ConfigError(f"{path} is not valid YAML", fix="restore it from the kit") from None
    if not isinstance(raw, dict) or raw.get("format") != SITE_KIT_FORMAT:
        raise ConfigError(f"{path} is not a {SITE_KIT_FORMAT} file", fix="restore it from the kit")
    try:
        kit = SiteKit(root=root.resolve(), federation=str(raw["federation"]), site=str(raw["site"]), coordinator=str(raw["coordinator"]),
                      officers=tuple(str(o) for o in raw.get("officers") or ()))
    except KeyError as exc:
        raise ConfigError(f"{path} lacks '{exc.args[0]}'", fix="restore it from the kit") from None
    if not NAME_RE.match(kit.site) or ":" not in kit.coordinator:
        raise ConfigError(f"{path}: site id or coordinator address is not valid", fix="restore it from the kit")
    return kit


# --- the site folder ------------------------------------------------------------------------------------------


def _copy_private(src: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)
        f.write(src.read_bytes())


def install_kit(kit: SiteKit, site_dir: Path, *, report: Callable[[str], None] = say) -> Site:
    """Set up ``site_dir`` from the kit (idempotent): site id, witness key, the coordinator's key, officers."""
    name = witness_key_name(kit.site)
    stem = key_stem(name)
    kit_vkey = kit.witness_dir / f"{stem}.vkey"
    keys = site_dir / "keys"
    if (site_dir / SITE_FILE).is_file():
        site = Site.open(site_dir)
        if site.site_id != kit.site:
            raise ConfigError(f"{site_dir} belongs to site {site.site_id}, the kit is for {kit.site}", fix="give this site's own kit, or another --site-dir")
    if (keys / f"{stem}.vkey").is_file():
        # The site keeps the witness key it has (its audit records name it). A kit without witness/ is fine then.
        mine = read_vkey_file(keys / f"{stem}.vkey")
        if kit_vkey.is_file() and read_vkey_file(kit_vkey) != mine:
            raise ConfigError(f"{site_dir} already has its own witness key ({mine.fingerprint}), not the kit's ({read_vkey_file(kit_vkey).fingerprint})",
                              fix=f"send {keys / (stem + '.vkey')} to the coordinator operator for its audit-trust/ folder and delete "
                                  f"the kit's witness/ folder; or start from a new site folder")
    else:
        if not kit_vkey.is_file() or not (kit.witness_dir / f"{stem}.key").is_file():
            raise ConfigError(f"the kit {kit.root} has no witness key {stem}.key/.vkey", fix="restore witness/ from the kit")
        _copy_private(kit.witness_dir / f"{stem}.key", keys / f"{stem}.key")
        shutil.copyfile(kit_vkey, keys / f"{stem}.vkey")
        report(f"installed the site's witness key ({read_vkey_file(kit_vkey).fingerprint})")
    site = init_site(site_dir, kit.site)  # finds the witness key in place and keeps it
    _trust(kit, site, report)
    _install_officers(kit, site, report)
    return site


def _trust(kit: SiteKit, site: Site, report: Callable[[str], None]) -> None:
    src = kit.root / "trust" / f"{key_stem(COORDINATOR_LOG_KEY)}.vkey"
    if not src.is_file():
        raise ConfigError(f"the kit {kit.root} has no trust/{src.name}", fix="restore trust/ from the kit")
    new = read_vkey_file(src)
    dest = site.root / "trust" / src.name
    if dest.is_file():
        old = read_vkey_file(dest)
        if old == new:
            return
        # A rotated coordinator key: keep the old one too, so the site can still check earlier checkpoints.
        kept = dest.with_name(f"{dest.stem}-{old.fingerprint.split(':')[-1][:12]}.vkey")
        dest.replace(kept)
        report(f"the coordinator's checkpoint key changed; the old one is kept as {kept.name}")
    trust_coordinator(site.root, src)
    audit_site(site, EventType.CONFIG_CHANGED, object={"type": "key", "id": new.name, "sha256": None},
               details={"change": "coordinator checkpoint key trusted", "key": new.fingerprint})
    report(f"trusting the coordinator's checkpoint key {new.fingerprint}")


def _install_officers(kit: SiteKit, site: Site, report: Callable[[str], None]) -> None:
    folder = kit.root / "officers"
    for officer in kit.officers:
        stem = key_stem(officer)
        src_key, src_vkey = folder / f"{stem}.key", folder / f"{stem}.vkey"
        if not src_vkey.is_file():
            raise ConfigError(f"the kit {kit.root} has no officers/{stem}.vkey", fix="restore officers/ from the kit")
        dest_vkey = site.root / "officers" / src_vkey.name
        if dest_vkey.is_file():
            if read_vkey_file(dest_vkey) != read_vkey_file(src_vkey):
                report(f"officer {officer} already has another key at this site; keeping the site's")
            continue
        if src_key.is_file():
            _copy_private(src_key, site.root / "officers" / src_key.name)
        shutil.copyfile(src_vkey, dest_vkey)
        key = read_vkey_file(src_vkey)
        audit_site(site, EventType.CONFIG_CHANGED, object={"type": "officer", "id": officer, "sha256": None},
                   details={"change": "officer key added", "key": key.fingerprint})
        report(f"officer {officer} added from the kit ({key.fingerprint})")


# --- checks -----------------------------------------------------------------------------------------------


def check_tls(kit: SiteKit, *, report: Callable[[str], None] = say, now: dt.datetime | None = None) -> None:
    """Refuse to start without the CA certificate or with a node key others can read; warn before the CA expires."""
    from cryptography import x509

    if not kit.ca_cert.is_file():
        raise ConfigError(f"the site kit {kit.root} has no ca.crt: refusing to run without TLS",
                          fix="restore ca.crt from the kit; --insecure-dev runs without TLS on a development machine only")
    try:
        cert = x509.load_pem_x509_certificate(kit.ca_cert.read_bytes())
    except ValueError:
        raise ConfigError(f"{kit.ca_cert} is not a PEM certificate", fix="restore it from the kit") from None
    now = now or dt.datetime.now(dt.timezone.utc)
    if now >= cert.not_valid_after_utc:
        raise ConfigError(f"the federation's CA certificate ({kit.ca_cert}) expired on {cert.not_valid_after_utc:%Y-%m-%d}",
                          fix="ask the coordinator operator for a new kit")
    left = cert.not_valid_after_utc - now
    if left < dt.timedelta(days=EXPIRY_WARNING_DAYS):
        report(f"WARNING: the federation's CA certificate ({kit.ca_cert}) expires on {cert.not_valid_after_utc:%Y-%m-%d} "
               f"({left.days} days left); ask the coordinator operator for a new kit before then")


def probe_coordinator(kit: SiteKit, *, report: Callable[[str], None] = say, timeout_s: float = 5.0,
                      now: dt.datetime | None = None) -> bool:
    """A TLS handshake with the coordinator before Flower's: names a certificate problem plainly, and warns when the
    coordinator's certificate expires within 30 days. Returns whether the coordinator answered.

    Raises:
        ConfigError: the coordinator's certificate is not signed by the kit's CA or does not name its address.
    """
    import ssl

    host, _, port_text = kit.coordinator.rpartition(":")
    host = host.strip("[]")
    context = ssl.create_default_context(cafile=str(kit.ca_cert))
    try:
        with socket.create_connection((host, int(port_text)), timeout=timeout_s) as raw, context.wrap_socket(raw, server_hostname=host) as tls:
            cert = tls.getpeercert()
    except ssl.SSLCertVerificationError as exc:
        raise ConfigError(f"the coordinator at {kit.coordinator} is not the federation's: {exc.verify_message}",
                          fix="check the address in site-kit.yaml and that ca.crt is the federation's (compare its fingerprint by phone)") from None
    except (OSError, ValueError) as exc:
        report(f"the coordinator at {kit.coordinator} does not answer yet ({type(exc).__name__}); the SuperNode keeps trying")
        return False
    expires = dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(cert["notAfter"]), dt.timezone.utc)
    left = expires - (now or dt.datetime.now(dt.timezone.utc))
    if left < dt.timedelta(days=EXPIRY_WARNING_DAYS):
        report(f"WARNING: the coordinator's certificate expires on {expires:%Y-%m-%d} ({left.days} days left); "
               "tell the coordinator operator (fedsilo coordinator renew-cert)")
    return True


def check_node_key(kit: SiteKit) -> None:
    if not kit.node_key.is_file():
        raise ConfigError(f"the site kit {kit.root} has no node.key", fix="restore node.key from the kit")
    mode = stat.S_IMODE(kit.node_key.stat().st_mode)
    if os.name == "posix" and mode & 0o077:
        raise ConfigError(f"{kit.node_key} is readable by others (mode {mode:o})", fix=f"chmod 600 {kit.node_key}")


# --- running ------------------------------------------------------------------------------------------------


def _wait_listening(proc: ManagedProcess, port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            return  # the caller reports why it exited
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise DeploymentError(f"the SuperNode did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s", fix=f"read {proc.log_path}")


def _exit_error(kit: SiteKit, proc: ManagedProcess) -> DeploymentError:
    code = proc.popen.returncode
    # flower-supernode logs "Exit Code: 305" (and exits 1 through its web server's shutdown) when the SuperLink
    # will not activate the node: its key is not registered there.
    if code == EXIT_NODE_REFUSED or f"Exit Code: {EXIT_NODE_REFUSED}" in proc.log_tail(40):
        return DeploymentError(f"the coordinator at {kit.coordinator} refused site {kit.site}'s node key "
                               f"(Flower SuperNode exit code {EXIT_NODE_REFUSED}: failed to activate)",
                               fix=f"if this silo was running a minute ago, start it again once its heartbeats have lapsed (about 20 s to "
                                   f"a minute); otherwise ask the coordinator operator to register {kit.root / 'node.pub'} (fedsilo "
                                   "coordinator start registers every site of its kit) and compare the fingerprints in both kits' README.md")
    return DeploymentError(f"the SuperNode stopped with exit code {code}: {_flower_error(proc)}", fix=f"read {proc.log_path}")


def _flower_error(proc: ManagedProcess) -> str:
    """Flower's own explanation from the log (the lines after its last "Exit Code:"), else the log's last lines."""
    try:
        lines = proc.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return ""
    marks = [i for i, line in enumerate(lines) if "Exit Code:" in line]
    if not marks:
        return proc.log_tail(3)
    text = " ".join(lines[marks[-1]:marks[-1] + 3])
    text = re.sub(r"\x1b\[[0-9;]*m|Please refer to the Flower documentation for more information:\s*\S+|<?https?://\S+", "", text)
    return " ".join(text.split())[:400]


def _activation(node: ManagedProcess, timeout_s: float = 120.0) -> str:
    """"active" once the SuperLink accepted the node (Flower logs its node id); "still-active" when it refused
    because the site's key still counts as connected (Flower error 2004, after a crash); else "refused"."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = node.output()
        if "SuperNode ID:" in text:
            return "active"
        if not node.alive():
            return "still-active" if "[code: 2004]" in node.output() else "refused"
        time.sleep(0.2)
    return "active" if node.alive() else "refused"


def run_node(kit: SiteKit, site_dir: Path, *, insecure_dev: bool = False, isolation: str = "warm", threads: int = 1,
             port: int = 0, on_ready: Callable[[], None] | None = None, rejoin_timeout_s: float = 180.0) -> None:
    """Run the site's SuperNode from ``kit`` until SIGINT/SIGTERM (raised as KeyboardInterrupt here) or until it stops.

    A silo restarted after a crash is refused until the coordinator sees its old heartbeats lapse; a site
    the coordinator has accepted before retries for up to ``rejoin_timeout_s``.
    """
    if isolation not in ISOLATION:
        raise ConfigError(f"isolation '{isolation}' is not known", fix=f"use one of: {', '.join(ISOLATION)}")
    if threads < 1:
        raise ConfigError(f"--threads must be 1 or more, got {threads}", fix="e.g. --threads 2")
    if insecure_dev:
        for _ in range(2):
            say(INSECURE_WARNING)
    else:
        check_tls(kit)
    check_node_key(kit)
    if not insecure_dev:
        probe_coordinator(kit)
    if port and port_in_use(port):
        raise ConfigError(f"port {port} is already in use on 127.0.0.1", fix="choose another --port, or leave it out to pick a free one")
    site = install_kit(kit, site_dir.resolve())
    node_port = port or free_port()
    # Flower authenticates SuperNodes only over TLS: without it the node key is not sent.
    tls = ["--insecure"] if insecure_dev else ["--root-certificates", str(kit.ca_cert), "--auth-supernode-private-key", str(kit.node_key)]
    flwr_home = site.root / "flwr"
    # "warm" also tunes Flower's polling (fedsilo.flower_tuning: tenths of a second instead of seconds), as the demo does.
    tuned = isolation == "warm"
    env = tuned_env(flower_env(flwr_home)) if tuned else flower_env(flwr_home)
    launcher = [sys.executable, "-m", "fedsilo.flower_tuning", "flower-supernode"] if tuned else [flower_bin("flower-supernode")]
    argv = [*launcher, *tls, "--superlink", kit.coordinator, "--host", LOOPBACK, "--port", str(node_port),
            "--node-config", f"site-dir='{site.root.resolve()}' threads={threads}", *(["--isolation", "process"] if isolation == "warm" else [])]
    with ProcessSet(site.logs_dir, env) as procs:
        deadline = time.monotonic() + rejoin_timeout_s
        while True:
            node = procs.start("supernode", argv, env=env)
            _wait_listening(node, node_port)
            state = _activation(node)
            if state == "active":
                flwr_home.mkdir(parents=True, exist_ok=True)
                (flwr_home / ACCEPTED_MARK).write_text(kit.coordinator + "\n", encoding="utf-8")
                break
            procs.finish(node)
            # Flower refuses a key that is not registered and a key still counted as connected alike (2004):
            # only a site the coordinator accepted before can be the second case, so only it retries.
            if state == "still-active" and (flwr_home / ACCEPTED_MARK).is_file() and time.monotonic() < deadline:
                # After a crash the coordinator counts the site's key as connected until its heartbeats lapse.
                say(f"site {kit.site}: the coordinator still counts this site as connected (its last SuperNode stopped moments ago); "
                    f"retrying in {REJOIN_RETRY_S:.0f} s")
                time.sleep(REJOIN_RETRY_S)
                continue
            raise _exit_error(kit, node)
        if isolation == "warm":
            # The Runtime API is the SuperNode's own loopback port: "--insecure" is that local hop only.
            procs.start("executor", [sys.executable, "-m", "silo_agent.warm_exec", "--insecure", "--runtime-api-address",
                                     f"{LOOPBACK}:{node_port}", "--parent-pid", str(node.popen.pid)], env=env)
        mode = "NO TLS (--insecure-dev)" if insecure_dev else "TLS"
        say(f"site {kit.site} of federation {kit.federation}: SuperNode dialing {kit.coordinator} ({mode}); site folder {site.root}; "
            f"logs in {site.logs_dir}; Ctrl-C stops it")
        if on_ready:
            on_ready()
        while True:
            for proc in procs.processes:
                if not proc.alive():
                    raise _exit_error(kit, proc) if proc is node else DeploymentError(
                        f"the site's ClientApp executor stopped with exit code {proc.popen.returncode}: {proc.log_tail(3)}", fix=f"read {proc.log_path}")
            time.sleep(1.0)


# --- command line -------------------------------------------------------------------------------------------


def add_start_command(ssub) -> None:
    """``fedsilo silo start`` (``ssub``: the ``fedsilo silo`` subparsers)."""
    p = ssub.add_parser("start", help="start this site's node from its kit (dials out to the coordinator; runs until Ctrl-C)")
    _arguments(p)
    p.set_defaults(func=_start)


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kit", type=Path, required=True, metavar="DIR", help="this site's kit from 'fedsilo provision' (KITS/<site>)")
    p.add_argument("--site-dir", type=Path, required=True, metavar="SITE_DIR", help="the site folder (set up from the kit on first start)")
    p.add_argument("--isolation", choices=ISOLATION, default="warm",
                   help="warm: one process imports torch once and forks per message, and Flower polls in tenths of a "
                        "second (default); subprocess: Flower's defaults")
    p.add_argument("--threads", type=int, default=1, help="torch threads for training (default 1)")
    p.add_argument("--port", type=int, default=0, help="the SuperNode's own port on 127.0.0.1 (default: a free one)")
    p.add_argument("--insecure-dev", action="store_true", help="UNSAFE: no TLS to the coordinator; development machines only")


def _start(args: argparse.Namespace) -> int:
    kit = load_site_kit(args.kit)
    try:
        run_node(kit, args.site_dir, insecure_dev=args.insecure_dev, isolation=args.isolation, threads=args.threads, port=args.port)
    except KeyboardInterrupt:
        say(f"site {kit.site}: SuperNode stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m silo_agent.node --kit DIR --site-dir SITE_DIR``: the same as ``fedsilo silo start``."""
    parser = argparse.ArgumentParser(prog="python -m silo_agent.node", description="Start this site's node from its kit.")
    _arguments(parser)
    args = parser.parse_args(argv)
    try:
        return _start(args)
    except FedsiloError as exc:
        print(f"fedsilo: error: {exc.one_line()}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
