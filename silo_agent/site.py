"""A hospital's site folder: its identity, registered datasets, and where it keeps state.

Layout of SITE_DIR::

    site.yaml        site id and registered datasets (name -> task, registry, and the datalist when registered from one)
    datasets/        the dataset registry (silo_agent.registry): per dataset registry.json and rejections.json
    keys/registry.secret   the key of the registry's keyed hashes (case ids), mode 0600
    policy.yaml      what any plan may do here (silo_agent.policy)
    officers/        site officers' keys; plans/  plans received, their submissions and decisions (silo_agent.approvals)
    audit/           the silo's local audit log (compliance.AuditLog) and its witness state
    keys/            the silo's witness key (private, never leaves the site)
    trust/           public checkpoint keys (.vkey) of the coordinators the silo trusts
    privacy/         the privacy ledger (one accountant history per dataset)
    cache/           decoded pixels (pipelines.dataset cache); pixels only, no headers
    logs/

Nothing here ever copies or rewrites the hospital's source images.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from compliance.records import EventType
from fedsilo.errors import ConfigError

SITE_FILE = "site.yaml"
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
TASKS = ("seg3d", "seg2d", "cls3d", "cls2d")


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: its registry (silo_agent.registry) and, when registered from one, its datalist.

    Entries written before the registry existed have a datalist only; they are read through it.
    """

    name: str
    task: str
    datalist: Path | None = None
    registry: Path | None = None


@dataclass(frozen=True)
class Site:
    root: Path
    site_id: str
    datasets: dict[str, DatasetEntry]

    @property
    def audit_dir(self) -> Path:
        return self.root / "audit"

    @property
    def privacy_dir(self) -> Path:
        return self.root / "privacy"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def models_dir(self) -> Path:
        """Models the site keeps and never sends: the personalized models (``training.personalize``)."""
        return self.root / "models"

    def actor(self) -> dict[str, str | None]:
        """The silo agent as an audit actor; its key is the site's witness key."""
        from silo_agent.witnessing import witness_fingerprint

        return {"kind": "silo", "id": self.site_id, "site": self.site_id, "role": "silo-agent",
                "key": witness_fingerprint(self.root, self.site_id)}

    def operator(self, role: str = "hospital-it") -> dict[str, str | None]:
        """The person running a ``fedsilo silo`` command, by their login name (a workforce identity, not PHI)."""
        try:
            user = getpass.getuser() or "unknown-user"
        except (KeyError, OSError):  # no passwd entry and no LOGNAME/USER (some containers)
            user = "unknown-user"
        return {"kind": "person", "id": user, "site": self.site_id, "role": role, "key": None}

    def dataset(self, name: str) -> DatasetEntry:
        try:
            return self.datasets[name]
        except KeyError:
            known = ", ".join(sorted(self.datasets)) or "none"
            raise ConfigError(
                f"site {self.site_id} has no dataset '{name}' (registered: {known})",
                fix=f"register it: fedsilo silo dataset add {name} --site {self.root} --images PATH [--labels PATH] --task TASK",
            ) from None

    @classmethod
    def open(cls, root: str | Path) -> "Site":
        root = Path(root)
        path = root / SITE_FILE
        if not path.is_file():
            raise ConfigError(f"no site folder at {root} ({SITE_FILE} missing)", fix="create one with: fedsilo silo init SITE_DIR --site NAME")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            raise ConfigError(f"{path} is not valid YAML", fix="fix the file or create the site again with fedsilo silo init") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path} must be a mapping", fix="fix the file or create the site again with fedsilo silo init")
        for key in raw:
            if key not in ("site", "datasets"):
                raise ConfigError(f"{path}: unknown key '{key}'", fix="use only 'site' and 'datasets'")
        site_id = raw.get("site")
        if not isinstance(site_id, str) or not NAME_RE.match(site_id):
            raise ConfigError(f"{path}: 'site' must be a short lower-case name, got {site_id!r}", fix="use letters, digits and '-', e.g. hospital0")
        datasets = {}
        for name, entry in (raw.get("datasets") or {}).items():
            if (not isinstance(entry, dict) or "task" not in entry or not set(entry) <= {"task", "datalist", "registry"}
                    or entry["task"] not in TASKS or not ({"datalist", "registry"} & set(entry))):
                raise ConfigError(f"{path}: dataset '{name}' needs 'task' ({'/'.join(TASKS)}) and a 'registry' (or a 'datalist')",
                                  fix="register it again with fedsilo silo dataset add")
            paths = {}
            for key in ("datalist", "registry"):
                if entry.get(key):
                    p = Path(entry[key])
                    paths[key] = p if p.is_absolute() else root / p
            datasets[name] = DatasetEntry(name=name, task=entry["task"], **paths)
        return cls(root=root, site_id=site_id, datasets=datasets)


def init_site(root: str | Path, site_id: str) -> Site:
    """Create a site folder (refuses to overwrite another site's folder)."""
    root = Path(root)
    if not NAME_RE.match(site_id):
        raise ConfigError(f"site name {site_id!r} is not allowed", fix="use lower-case letters, digits and '-', e.g. hospital0")
    path = root / SITE_FILE
    if path.exists():
        existing = Site.open(root)
        if existing.site_id != site_id:
            raise ConfigError(f"{root} already belongs to site {existing.site_id}", fix="choose another folder")
        return existing
    from silo_agent.witnessing import ensure_witness_key

    for sub in ("audit", "privacy", "cache", "logs", "trust"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ensure_witness_key(root, site_id)
    _write(path, {"site": site_id, "datasets": {}})
    from silo_agent.policy import write_default_policy

    write_default_policy(root)
    site = Site.open(root)
    audit_site(site, EventType.CONFIG_CHANGED, object={"type": "site", "id": site_id, "sha256": _sha256_file(path)},
               details={"change": "site created"})
    record_policy_if_changed(site)
    return site


def register_dataset(site: Site, name: str, *, task: str, datalist: Path | None = None, images: Path | None = None,
                     labels: Path | None = None, classes: tuple[str, ...] | None = None, progress=None) -> Site:
    """Scan and register a dataset (silo_agent.registry.register) and return the reopened site.

    Give a MONAI datalist, or ``images`` (a folder, file or DICOMDIR) with ``labels`` (NIfTI masks or a class CSV).
    Raises DataError when nothing usable was found (the rejection list is written first).
    """
    from silo_agent.registry import register

    register(site, name, task=task, datalist=datalist, images=images, labels=labels, classes=classes, progress=progress)
    return Site.open(site.root)


def update_dataset_entry(site: Site, name: str, *, task: str, registry: Path, datalist: Path | None) -> bool:
    """Point site.yaml's entry for ``name`` at its registry; returns whether an entry was replaced."""
    raw = yaml.safe_load((site.root / SITE_FILE).read_text(encoding="utf-8")) or {}
    datasets = raw.get("datasets") or {}
    replaced = name in datasets
    try:
        reg = Path(registry).resolve().relative_to(site.root.resolve()).as_posix()
    except ValueError:
        reg = str(Path(registry).resolve())
    entry = {"task": task, "registry": reg}
    if datalist is not None:
        entry["datalist"] = str(Path(datalist).resolve())
    datasets[name] = entry
    raw["datasets"] = datasets
    _write(site.root / SITE_FILE, raw)
    return replaced


def drop_dataset_entry(site: Site, name: str) -> None:
    raw = yaml.safe_load((site.root / SITE_FILE).read_text(encoding="utf-8")) or {}
    (raw.get("datasets") or {}).pop(name, None)
    _write(site.root / SITE_FILE, raw)


def audit_site(site: Site, event: str, *, actor: dict | None = None, **fields) -> None:
    """Append one record to the site's audit log, by default as the person running the command."""
    from compliance import AuditLog

    with AuditLog.open(site.audit_dir, source="silo-cli") as log:
        log.append(event, actor=actor or site.operator(), **fields)


def record_policy_if_changed(site: Site, *, actor: dict | None = None) -> bool:
    """Check policy.yaml and, when its bytes differ from the last recorded version, audit policy.changed.

    Run by ``fedsilo silo policy check|reset`` and by the silo agent before each message, so a hand edit
    is recorded before it takes effect. Returns whether a change was recorded.
    """
    from compliance import AuditLog
    from silo_agent.policy import load_policy, policy_digest

    policy = load_policy(site.root)  # refuses an invalid policy before recording it
    digest = policy_digest(site.root)
    with AuditLog.open(site.audit_dir, source="silo-cli" if actor is None else "silo-agent") as log:
        last = None
        for record in log.records():
            if record["event"] == EventType.POLICY_CHANGED:
                last = (record.get("object") or {}).get("sha256")
        if last == digest:
            return False
        log.append(EventType.POLICY_CHANGED, actor=actor or site.operator(), object={"type": "policy", "id": "policy.yaml", "sha256": digest},
                   details={"previous_sha256": last, "max_epsilon_per_plan": policy.max_epsilon_per_plan,
                            "lifetime_epsilon_per_dataset": policy.lifetime_epsilon_per_dataset, "min_silos": policy.min_silos,
                            "require_dp": policy.require_dp})
    return True


def _sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)
