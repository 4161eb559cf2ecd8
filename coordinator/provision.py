"""``fedsilo provision``: startup kits for a federation's coordinator and sites, from one project file.

Project file (YAML; unknown keys are errors)::

    federation: hospitals-2025          # the federation's name (lower-case, digits, '-')
    coordinator:
      addresses: [fl.example.org, 203.0.113.10]   # DNS names and/or IPs silos dial; all go in the certificate
      port: 9093
      certificate_days: 365             # optional (server certificate; the CA gets ca_days, default 3650)
    sites:
      - id: hospital0
        officers: [j.smith]             # optional: site officers who approve plans
      - id: hospital1

Kits written under ``--out KITS`` (private keys mode 0600; nothing here prints or logs key material)::

    ca/           ca.crt, ca.key: the CA. Its key signs server certificates only: store this folder offline.
    coordinator/  ca.crt, server.pem, server.key (SAN: the addresses, plus 127.0.0.1 and localhost so the
                  operator's own commands reach the SuperLink on loopback), sites/<site>.pub (node public keys
                  to register), audit-keys/ (the coordinator's Ed25519 checkpoint key), audit-trust/ (its
                  public key and every site's witness public key), coordinator.yaml, README.md
    <site>/       ca.crt, node.key, node.pub (EC P-384 OpenSSH: the SuperNode's authentication key),
                  witness/ (the site's Ed25519 witness key), trust/ (the coordinator's checkpoint public key),
                  officers/<name>.key/.vkey (person keys), site-kit.yaml, README.md
    researcher/   ca.crt and a README: what a researcher needs to submit plans (they make their own key)

Every README lists the fingerprints to confirm out of band (by phone, not by the channel that carried the
kit): SHA-256 of the certificates' DER, of the node public key lines, and the Ed25519 key fingerprints.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from compliance.keys import generate_signer, key_stem
from coordinator import pki
from fedsilo.errors import ConfigError
from fedsilo.protocol import COORDINATOR_LOG_KEY

COORDINATOR_KIT_FORMAT = "fedsilo-coordinator-kit/v1"
SITE_KIT_FORMAT = "fedsilo-site-kit/v1"
COORDINATOR_KIT_FILE = "coordinator.yaml"
SITE_KIT_FILE = "site-kit.yaml"
#: The same rule as silo_agent.site.NAME_RE (the coordinator may not import the silo agent; a test holds them equal).
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
RESERVED = ("ca", "coordinator", "researcher")
LOOPBACK_NAMES = ("127.0.0.1", "localhost")
_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def witness_key_name(site: str) -> str:
    """The name of a site's witness key: silo_agent.witnessing.witness_key_name (a test holds them equal)."""
    return f"{site}-witness"


@dataclass(frozen=True)
class SiteSpec:
    id: str
    officers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Project:
    federation: str
    addresses: tuple[str, ...]
    port: int
    sites: tuple[SiteSpec, ...]
    certificate_days: int = 365
    ca_days: int = 3650

    @property
    def dial_address(self) -> str:
        """What silos dial: the first address and the port (IPv6 in brackets)."""
        host = self.addresses[0]
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


# --- the project file ---------------------------------------------------------------------------------------


def _keys(where: str, raw: dict, allowed: tuple[str, ...], required: tuple[str, ...]) -> None:
    for key in raw:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key '{key}'", fix=f"use only: {', '.join(allowed)}")
    for key in required:
        if key not in raw:
            raise ConfigError(f"{where}: '{key}' is missing", fix=f"add '{key}' (see configs/project.example.yaml)")


def _host(value: object, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: an address must be a DNS name or an IP address, got {value!r}", fix="e.g. fl.example.org or 203.0.113.10")
    text = value.strip().lower()
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    labels = text.rstrip(".").split(".")
    if len(text) > 253 or not all(_HOST_LABEL.match(label) for label in labels):
        raise ConfigError(f"{where}: '{value}' is neither an IP address nor a DNS name", fix="use letters, digits, '-' and '.', e.g. fl.example.org")
    return ".".join(labels)


def _days(raw: dict, key: str, default: int, where: str) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 36500:
        raise ConfigError(f"{where}: '{key}' must be a whole number of days (1-36500), got {value!r}", fix=f"e.g. {key}: {default}")
    return value


def parse_project(raw: object, source: str = "the project file") -> Project:
    """Validate a project mapping; every error names the key and the fix in one line."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must be a mapping with federation, coordinator and sites", fix="see configs/project.example.yaml")
    _keys(source, raw, ("federation", "coordinator", "sites", "ca_days"), ("federation", "coordinator", "sites"))
    name = raw["federation"]
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ConfigError(f"{source}: federation name {name!r} is not allowed", fix="use lower-case letters, digits and '-', e.g. hospitals-2025")
    coord = raw["coordinator"]
    where = f"{source}: coordinator"
    if not isinstance(coord, dict):
        raise ConfigError(f"{where} must be a mapping with addresses and port", fix="see configs/project.example.yaml")
    _keys(where, coord, ("addresses", "port", "certificate_days"), ("addresses", "port"))
    addresses = coord["addresses"]
    if isinstance(addresses, str):
        addresses = [addresses]
    if not isinstance(addresses, list) or not addresses:
        raise ConfigError(f"{where}.addresses must list at least one DNS name or IP address", fix="e.g. addresses: [fl.example.org]")
    hosts = tuple(dict.fromkeys(_host(a, f"{where}.addresses") for a in addresses))
    port = coord["port"]
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ConfigError(f"{where}.port must be a TCP port (1-65535), got {port!r}", fix="e.g. port: 9093")
    sites_raw = raw["sites"]
    if not isinstance(sites_raw, list) or not sites_raw:
        raise ConfigError(f"{source}: 'sites' must list at least one site", fix="e.g. sites: [{id: hospital0}]")
    sites: list[SiteSpec] = []
    for i, entry in enumerate(sites_raw):
        if isinstance(entry, str):
            entry = {"id": entry}
        swhere = f"{source}: sites[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{swhere} must be a mapping with 'id' (and optional 'officers')", fix="e.g. - id: hospital0")
        _keys(swhere, entry, ("id", "officers"), ("id",))
        site = entry["id"]
        if not isinstance(site, str) or not NAME_RE.match(site):
            raise ConfigError(f"{swhere}: site id {site!r} is not allowed", fix="use lower-case letters, digits and '-', e.g. hospital0")
        if site in RESERVED:
            raise ConfigError(f"{swhere}: site id '{site}' is reserved for a kit folder", fix=f"choose another id (reserved: {', '.join(RESERVED)})")
        if any(s.id == site for s in sites):
            raise ConfigError(f"{swhere}: site '{site}' is listed twice", fix="give each site once")
        officers = entry.get("officers") or []
        if not isinstance(officers, list):
            raise ConfigError(f"{swhere}.officers must be a list of names", fix="e.g. officers: [j.smith]")
        for officer in officers:
            if not isinstance(officer, str) or not NAME_RE.match(officer.replace(".", "-").replace("_", "-")):
                raise ConfigError(f"{swhere}.officers: officer name {officer!r} is not allowed", fix="use letters, digits, '.', '_' and '-', e.g. j.smith")
        if len(set(officers)) != len(officers):
            raise ConfigError(f"{swhere}.officers lists a name twice", fix="give each officer once")
        sites.append(SiteSpec(site, tuple(officers)))
    return Project(federation=name, addresses=hosts, port=port, sites=tuple(sites),
                   certificate_days=_days(coord, "certificate_days", 365, where), ca_days=_days(raw, "ca_days", 3650, source))


def load_project(path: Path) -> Project:
    if not path.is_file():
        raise ConfigError(f"no project file at {path}", fix="write one like configs/project.example.yaml")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"{path} is not valid YAML{at}", fix="fix the YAML syntax") from None
    return parse_project(raw, str(path))


# --- writing the kits ---------------------------------------------------------------------------------------


@dataclass
class ProvisionResult:
    out: Path
    fingerprints: dict[str, str] = field(default_factory=dict)  # what -> fingerprint, for the summary

    def kit(self, name: str) -> Path:
        return self.out / name


def kit_folders(project: Project) -> list[str]:
    return ["ca", "coordinator", "researcher", *(s.id for s in project.sites)]


def provision(project: Project, out: Path, *, force: bool = False) -> ProvisionResult:
    """Write the CA, coordinator, site and researcher kits of ``project`` under ``out``.

    Refuses to overwrite an existing kit folder unless ``force`` (then those folders are replaced whole).
    """
    existing = [name for name in kit_folders(project) if (out / name).exists()]
    if existing and not force:
        raise ConfigError(f"{out} already holds kit folder(s): {', '.join(existing)}",
                          fix="choose another --out, or pass --force to replace them (the old keys are then lost)")
    for name in existing:
        shutil.rmtree(out / name)
    out.mkdir(parents=True, exist_ok=True)
    result = ProvisionResult(out)
    fp = result.fingerprints
    sans = tuple(dict.fromkeys((*project.addresses, *LOOPBACK_NAMES)))

    ca = pki.create_ca(out / "ca" / "ca.crt", out / "ca" / "ca.key", common_name=f"fedsilo {project.federation} CA", days=project.ca_days)
    fp["CA certificate"] = pki.certificate_fingerprint(ca.cert_path)
    coord = out / "coordinator"
    coord.mkdir()
    shutil.copyfile(ca.cert_path, coord / "ca.crt")
    pki.issue_server_cert(ca, coord / "server.pem", coord / "server.key", hosts=sans, days=project.certificate_days)
    fp["server certificate"] = pki.certificate_fingerprint(coord / "server.pem")
    log_key = generate_signer(coord / "audit-keys", COORDINATOR_LOG_KEY, role="log")
    fp["coordinator checkpoint key"] = log_key.fingerprint
    log_vkey = coord / "audit-keys" / f"{key_stem(COORDINATOR_LOG_KEY)}.vkey"
    (coord / "audit-trust").mkdir()
    shutil.copyfile(log_vkey, coord / "audit-trust" / log_vkey.name)

    site_rows: list[tuple[str, str, str, list[tuple[str, str]]]] = []
    for site in project.sites:
        kit = out / site.id
        kit.mkdir()
        shutil.copyfile(ca.cert_path, kit / "ca.crt")
        node = pki.create_node_key(kit, site.id, stem="node")
        (coord / "sites").mkdir(exist_ok=True)
        shutil.copyfile(node.public_key, coord / "sites" / f"{site.id}.pub")
        witness = generate_signer(kit / "witness", witness_key_name(site.id), role="witness")
        wvkey = kit / "witness" / f"{key_stem(witness.name)}.vkey"
        shutil.copyfile(wvkey, coord / "audit-trust" / wvkey.name)
        (kit / "trust").mkdir()
        shutil.copyfile(log_vkey, kit / "trust" / log_vkey.name)
        officers = []
        for officer in site.officers:
            signer = generate_signer(kit / "officers", officer, role="person")
            officers.append((officer, signer.fingerprint))
        fp[f"{site.id} node key"] = node.fingerprint
        fp[f"{site.id} witness key"] = witness.fingerprint
        site_rows.append((site.id, node.fingerprint, witness.fingerprint, officers))
        _write_yaml(kit / SITE_KIT_FILE, {"format": SITE_KIT_FORMAT, "federation": project.federation, "site": site.id,
                                             "coordinator": project.dial_address, "officers": list(site.officers)})
        (kit / "README.md").write_text(_site_readme(project, site, fp, officers), encoding="utf-8")

    _write_yaml(coord / COORDINATOR_KIT_FILE, {"format": COORDINATOR_KIT_FORMAT, "federation": project.federation,
                                               "addresses": list(project.addresses), "port": project.port,
                                               "sites": [s.id for s in project.sites]})
    (coord / "README.md").write_text(_coordinator_readme(project, fp, sans, _expiry(coord / "server.pem"), site_rows), encoding="utf-8")
    (out / "ca" / "README.md").write_text(_ca_readme(project, fp), encoding="utf-8")
    researcher = out / "researcher"
    researcher.mkdir()
    shutil.copyfile(ca.cert_path, researcher / "ca.crt")
    (researcher / "README.md").write_text(_researcher_readme(project, fp), encoding="utf-8")
    return result


def _write_yaml(path: Path, data: dict) -> None:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


# --- README files -------------------------------------------------------------------------------------------


def _expiry(path: Path) -> str:
    return f"{pki.load_certificate(path).not_valid_after_utc:%Y-%m-%d}"


def _ca_readme(project: Project, fp: dict[str, str]) -> str:
    return f"""# Certificate authority of federation {project.federation}

`ca.key` signs the coordinator's server certificate. Nothing running needs it: store this folder
offline (an encrypted USB key in a safe, a hardware token), and bring it out only to issue a new server
certificate (`fedsilo coordinator renew-cert --kit KITS/coordinator --ca KITS/ca`).
Anyone holding `ca.key` can impersonate the coordinator to every site.

CA certificate fingerprint (SHA-256 of DER): `{fp['CA certificate']}`
"""


def _coordinator_readme(project: Project, fp: dict[str, str], sans: tuple[str, ...], expires: str, sites) -> str:
    rows = "\n".join(f"| {site} | `{node}` | `{witness}` |" for site, node, witness, _ in sites)
    return f"""# Coordinator kit of federation {project.federation}

Start the coordinator (TLS, SuperNode authentication, persistent state in this folder):

    fedsilo coordinator start --kit KITS/coordinator

Silos dial `{project.dial_address}`; open TCP port {project.port} inbound to this machine (only).
Private keys here (mode 0600): `server.key` (TLS) and `audit-keys/` (signs the audit log's checkpoints).
Back up this whole folder (keys, `superlink-state.db`, `runs/`); see docs/deployment.md.

## Fingerprints: confirm out of band (by phone with each site, not over the channel that carried the kit)

| what | fingerprint |
| --- | --- |
| CA certificate (SHA-256 of DER) | `{fp['CA certificate']}` |
| server certificate (SHA-256 of DER), valid until {expires} | `{fp['server certificate']}` |
| coordinator checkpoint key (Ed25519) | `{fp['coordinator checkpoint key']}` |

Server certificate subjectAltName: {', '.join(sans)}

| site | node key (SHA-256 of the OpenSSH public key) | witness key (Ed25519) |
| --- | --- | --- |
{rows}
"""


def _site_readme(project: Project, site: SiteSpec, fp: dict[str, str], officers: list[tuple[str, str]]) -> str:
    officer_rows = "\n".join(f"| officer {name} (Ed25519) | `{f}` |" for name, f in officers)
    return f"""# Site kit: {site.id} in federation {project.federation}

Start this site's node (it only dials out, to `{project.dial_address}`; open no inbound port):

    fedsilo silo start --kit KITS/{site.id} --site-dir /path/to/site-folder

The first start sets up the site folder from this kit (site id, witness key, the coordinator's
checkpoint key, officers). Private keys here (mode 0600, never send them anywhere): `node.key`
(authenticates this node to the coordinator), `witness/` (cosigns the coordinator's audit log),
`officers/*.key` (each officer's approval key: hand each to its officer and to no one else).

## Fingerprints: confirm out of band (by phone with the coordinator operator)

| what | fingerprint |
| --- | --- |
| CA certificate (SHA-256 of DER) | `{fp['CA certificate']}` |
| coordinator checkpoint key (Ed25519) | `{fp['coordinator checkpoint key']}` |
| this site's node key (SHA-256 of the OpenSSH public key) | `{fp[f'{site.id} node key']}` |
| this site's witness key (Ed25519) | `{fp[f'{site.id} witness key']}` |
{officer_rows}
"""


def _researcher_readme(project: Project, fp: dict[str, str]) -> str:
    return f"""# Researcher kit of federation {project.federation}

Submit a signed plan to the coordinator at `{project.dial_address}`:

    fedsilo plan keygen --researcher YOUR.NAME --out ~/fedsilo-keys      # once; send the fingerprint to the sites
    fedsilo plan submit plan.yaml --key ~/fedsilo-keys/YOUR.NAME.key \\
        --federation {project.federation} --superlink {project.dial_address} --ca ca.crt

CA certificate fingerprint (SHA-256 of DER), to confirm with the coordinator operator: `{fp['CA certificate']}`
"""
