"""The site's dataset registry: what a scan found, stored in SITE_DIR without PHI, and checked for drift.

Layout (inside the site folder; none of it leaves the site)::

    keys/registry.secret            32 random bytes (hex), mode 0600: the key of every keyed hash below
    datasets/NAME/registry.json     the registered dataset: per case a case id, source paths, file hashes,
                                    a keyed hash of the series UID, shape, spacing, content hash, split;
                                    per dataset the counts and a manifest hash
    datasets/NAME/rejections.json   the latest scan's rejection list: one reason per file (paths are local)

Identifiers: a case id is ``HMAC-SHA256(site secret, "case\\0" + identity)`` (RFC 2104), where the identity
is the SeriesInstanceUID (DICOM) or the image's path relative to the registered folder (NIfTI); the
series UID is stored only as ``HMAC-SHA256(site secret, "series\\0" + UID)``. The ids are stable at the
site, cannot be linked across sites (each has its own secret), and cannot be reversed to a UID or a
PatientID (no header value is ever an input except the series UID, and that only through the HMAC).

Split: a datalist's split is kept; otherwise a case is a test case when its case id, read as a number,
is divisible by 5 (about 20%, deterministic, and unchanged when other cases are added), with at least
one case in each split when there are two or more.

The manifest hash is sha256 over the canonical JSON of (case id, split, content hash, shape, spacing,
class) of every case, sorted by case id: the same data registered again gives the same hash, wherever
the drive is mounted. Source files are never copied, rewritten or deleted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compliance.records import EventType
from fedsilo.errors import ConfigError, DataError

REGISTRY_DIR = "datasets"
SECRET_FILE = Path("keys") / "registry.secret"
SCHEMA = 1
TEST_EVERY = 5  # one case in five is a test case (80/20)

Progress = Callable[[int, int], None]


# ------------------------------------------------------------------------------------------------ keyed hashes


def site_secret(site_root: Path) -> bytes:
    """The site's registry key, created on first use (mode 0600)."""
    path = Path(site_root) / SECRET_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.write(secrets.token_hex(32) + "\n")
    text = path.read_text(encoding="ascii").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise ConfigError(f"{path} is damaged", fix="restore it from the site's backup (case ids depend on it)")
    return key


def keyed_hash(secret: bytes, kind: str, value: str) -> str:
    """HMAC-SHA256(secret, kind NUL value), hex (RFC 2104)."""
    return hmac.new(secret, f"{kind}\0{value}".encode("utf-8", "surrogateescape"), hashlib.sha256).hexdigest()


# ------------------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class RegisteredCase:
    case_id: str
    split: str
    image_format: str
    image_files: tuple[str, ...]
    image_sha256: tuple[str, ...]
    label_file: str | None
    label_sha256: str | None
    label_class: int | None
    series_hmac: str | None
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    content_sha256: str
    stat_sha256: str

    @property
    def files(self) -> tuple[str, ...]:
        return self.image_files + ((self.label_file,) if self.label_file else ())

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_files"], d["image_sha256"] = list(self.image_files), list(self.image_sha256)
        d["shape"], d["spacing"] = list(self.shape), [round(s, 6) for s in self.spacing]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "RegisteredCase":
        return cls(**{**d, "image_files": tuple(d["image_files"]), "image_sha256": tuple(d["image_sha256"]),
                      "shape": tuple(d["shape"]), "spacing": tuple(d["spacing"])})


@dataclass(frozen=True)
class Registry:
    name: str
    task: str
    registered_at: str
    source: dict[str, Any]
    counts: dict[str, Any]
    manifest_sha256: str
    cases: tuple[RegisteredCase, ...]
    notes: tuple[str, ...] = field(default_factory=tuple)

    def split(self, split: str) -> list[RegisteredCase]:
        return [c for c in self.cases if c.split == split]

    def case_sources(self, split: str):
        """The loader's view of one split (pipelines.dataset.CaseSource)."""
        from pipelines.dataset import CaseSource

        return [CaseSource(content_sha256=c.content_sha256, image_format=c.image_format, image_files=c.image_files,
                           label_file=c.label_file, label_class=c.label_class, stat_sha256=c.stat_sha256)
                for c in self.split(split)]

    def to_json(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "name": self.name, "task": self.task, "registered_at": self.registered_at,
                "source": self.source, "counts": self.counts, "manifest_sha256": self.manifest_sha256,
                "notes": list(self.notes), "cases": [c.to_json() for c in self.cases]}


def load_registry(path: Path) -> Registry:
    if not Path(path).is_file():
        raise ConfigError(f"no registry at {path}", fix="register the dataset again with: fedsilo silo dataset add")
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        if raw.get("schema") != SCHEMA:
            raise ValueError("schema")
        return Registry(name=raw["name"], task=raw["task"], registered_at=raw["registered_at"], source=raw["source"],
                        counts=raw["counts"], manifest_sha256=raw["manifest_sha256"], notes=tuple(raw.get("notes", ())),
                        cases=tuple(RegisteredCase.from_json(c) for c in raw["cases"]))
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{path} is not a valid dataset registry", fix="register the dataset again with: fedsilo silo dataset add") from None


def manifest_hash(cases: tuple[RegisteredCase, ...] | list[RegisteredCase]) -> str:
    rows = [{"case_id": c.case_id, "split": c.split, "content_sha256": c.content_sha256, "shape": list(c.shape),
             "spacing": [round(s, 6) for s in c.spacing], "class": c.label_class} for c in sorted(cases, key=lambda c: c.case_id)]
    return hashlib.sha256(json.dumps(rows, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# ------------------------------------------------------------------------------------------------ registering


@dataclass(frozen=True)
class Registration:
    """What ``dataset add`` reports."""

    registry: Registry
    registry_path: Path
    rejections_path: Path
    files_seen: int
    rejected: dict[str, int]
    seconds: float
    replaced: bool

    def summary(self) -> dict[str, Any]:
        shapes = sorted({"x".join(map(str, c.shape)) for c in self.registry.cases})
        return {"dataset": self.registry.name, "task": self.registry.task, **self.registry.counts, "shapes": shapes,
                "rejected_by_kind": self.rejected, "manifest_sha256": self.registry.manifest_sha256,
                "registry_file": str(self.registry_path), "rejections_file": str(self.rejections_path),
                "notes": list(self.registry.notes), "seconds": round(self.seconds, 3), "replaced": self.replaced}


def _splits(cases: list[dict[str, Any]]) -> None:
    if all(c["split"] is not None for c in cases):
        return
    for c in cases:
        c["split"] = "test" if int(c["case_id"], 16) % TEST_EVERY == 0 else "training"
    if len(cases) >= 2:
        by_id = sorted(cases, key=lambda c: c["case_id"])
        if not any(c["split"] == "test" for c in cases):
            by_id[0]["split"] = "test"
        if not any(c["split"] == "training" for c in cases):
            by_id[-1]["split"] = "training"


def build_registry(site_root: Path, name: str, task: str, scan, source: dict[str, Any]) -> tuple[Registry, list]:
    """Turn a scan result into registry records (keyed ids, content hashes, split); returns it and the rejections."""
    from pipelines.dataset import case_content_hash, stat_fingerprint
    from pipelines.ingest import Rejection

    secret = site_secret(site_root)
    rejections = list(scan.rejections)
    rows: list[dict[str, Any]] = []
    by_identity: dict[str, dict] = {}
    by_content: dict[str, dict] = {}
    for case in scan.cases:
        image, label = case.image, case.label
        case_id = keyed_hash(secret, "case", image.identity)[:32]
        label_sha = label.sha256[0] if label else None
        content = case_content_hash(image.sha256, label_sha)
        first = by_identity.get(case_id) or by_content.get(content)
        if first is not None:
            why = "the same series" if case_id in by_identity else "the same content"
            rejections += [Rejection(f, "duplicate", f"{why} as the case registered from {first['image_files'][0]}") for f in image.files]
            continue
        files = image.files + (label.files if label else ())
        stats = list(image.stats + (label.stats if label else ()))
        row = {"case_id": case_id, "split": case.split, "image_format": image.format, "image_files": image.files,
               "image_sha256": image.sha256, "label_file": label.files[0] if label else None, "label_sha256": label_sha,
               "label_class": case.label_class, "series_hmac": keyed_hash(secret, "series", image.series_uid) if image.series_uid else None,
               "shape": tuple(image.shape), "spacing": tuple(float(s) for s in image.spacing), "content_sha256": content,
               "stat_sha256": stat_fingerprint(files, stats)}
        by_identity[case_id] = row
        by_content[content] = row
        rows.append(row)
    _splits(rows)
    cases = tuple(sorted((RegisteredCase(**r) for r in rows), key=lambda c: c.case_id))
    counts = {"cases": len(cases), "training": sum(c.split == "training" for c in cases), "test": sum(c.split == "test" for c in cases),
              "files_seen": scan.files_seen, "files_rejected": len(rejections),
              "files_in_cases": sum(len(c.files) for c in cases)}
    if task.startswith("cls"):
        counts["classes"] = {str(k): sum(c.label_class == k for c in cases) for k in sorted({c.label_class for c in cases})}
    registry = Registry(name=name, task=task, registered_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), source=source,
                        counts=counts, manifest_sha256=manifest_hash(cases), cases=cases, notes=tuple(scan.notes))
    return registry, rejections


def dataset_dir(site_root: Path, name: str) -> Path:
    return Path(site_root) / REGISTRY_DIR / name


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def register(site, name: str, *, task: str, images: Path | None = None, labels: Path | None = None,
             datalist: Path | None = None, classes: tuple[str, ...] | None = None, workers: int | None = None,
             progress: Progress | None = None) -> Registration:
    """Scan the source, write the registry and the rejection list, update site.yaml, audit dataset.registered.

    Raises DataError (exit 2) when nothing usable was found; the rejection list is written first.
    """
    from pipelines.ingest import scan_datalist, scan_images
    from silo_agent.site import NAME_RE, TASKS, audit_site, update_dataset_entry

    if not NAME_RE.match(name):
        raise ConfigError(f"dataset name {name!r} is not allowed", fix="use lower-case letters, digits and '-'")
    if task not in TASKS:
        raise ConfigError(f"task '{task}' is not known", fix=f"use one of: {', '.join(TASKS)}")
    if (images is None) == (datalist is None):
        raise ConfigError("give either --images (with --labels) or --datalist", fix="e.g. --images /data/ct --labels /data/ct-masks")
    if datalist is not None and labels is not None:
        raise ConfigError("--labels goes with --images; a datalist names its own labels", fix="drop --labels")
    start = time.perf_counter()
    if datalist is not None:
        datalist = Path(datalist)
        if not datalist.is_file():
            raise ConfigError(f"no datalist at {datalist}", fix="give the path of a MONAI datalist JSON")
        scan = scan_datalist(datalist, task=task, workers=workers, progress=progress)
        source = {"kind": "datalist", "datalist": str(datalist.resolve())}
    else:
        scan = scan_images(Path(images), task=task, labels=Path(labels) if labels else None, classes=classes, workers=workers,
                           progress=progress)
        source = {"kind": "images", "images": str(Path(images).resolve()), "labels": str(Path(labels).resolve()) if labels else None}
        if classes:
            source["classes"] = list(classes)
    registry, rejections = build_registry(site.root, name, task, scan, source)
    folder = dataset_dir(site.root, name)
    rejections_path = folder / "rejections.json"
    _write_json(rejections_path, {"dataset": name, "scanned_at": registry.registered_at, "files_seen": scan.files_seen,
                                  "rejections": [r.to_dict() for r in rejections], "notes": list(scan.notes)})
    by_kind: dict[str, int] = {}
    for r in rejections:
        by_kind[r.kind] = by_kind.get(r.kind, 0) + 1
    where = datalist if datalist is not None else images
    if not registry.cases:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(by_kind.items())) or "no files"
        raise DataError(f"no usable case found in {where}: {scan.files_seen} file(s) scanned, {len(rejections)} rejected ({kinds}); "
                        f"the full list is in {rejections_path}", fix="see the reasons in the list; check --task, --images and --labels")
    registry_path = folder / "registry.json"
    _write_json(registry_path, registry.to_json())
    replaced = update_dataset_entry(site, name, task=task, registry=registry_path, datalist=datalist)
    sha = hashlib.sha256(datalist.read_bytes()).hexdigest() if datalist is not None else registry.manifest_sha256
    # Counts and hashes only: a source path may name a patient (hospital folders often do).
    audit_site(site, EventType.DATASET_REGISTERED, object={"type": "dataset", "id": name, "sha256": sha},
               details={"task": task, "replaced": replaced, "source": source["kind"], "cases": registry.counts["cases"],
                        "training": registry.counts["training"], "test": registry.counts["test"],
                        "files_rejected": len(rejections), "manifest_sha256": registry.manifest_sha256})
    return Registration(registry=registry, registry_path=registry_path, rejections_path=rejections_path, files_seen=scan.files_seen,
                        rejected=dict(sorted(by_kind.items())), seconds=time.perf_counter() - start, replaced=replaced)


# ------------------------------------------------------------------------------------------------ drift check


@dataclass(frozen=True)
class DriftReport:
    dataset: str
    cases: int
    unchanged: int
    changed: tuple[str, ...]  # case ids whose files' content changed
    missing: tuple[str, ...]  # case ids with a missing file
    touched: int  # cases whose files were touched (mtime) but hold the same bytes: stat fingerprint refreshed
    new_files: int  # files under the registered folder that neither a case nor the rejection list names
    manifest_sha256: str

    @property
    def clean(self) -> bool:
        return not self.changed and not self.missing and not self.new_files

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "changed": list(self.changed), "missing": list(self.missing), "clean": self.clean}


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check(site, name: str, *, progress: Progress | None = None) -> DriftReport:
    """Re-hash every registered file and report drift; a touched but unchanged file only refreshes its stat fingerprint."""
    from pipelines.dataset import stat_fingerprint

    entry = site.dataset(name)
    if entry.registry is None:
        raise ConfigError(f"dataset '{name}' was registered before the registry existed", fix=f"register it again: fedsilo silo dataset add {name} ...")
    registry = load_registry(entry.registry)
    changed, missing, refreshed = [], [], []
    touched = 0
    for i, case in enumerate(registry.cases):
        try:
            image = tuple(_file_sha256(f) for f in case.image_files)
            label = _file_sha256(case.label_file) if case.label_file else None
        except OSError:
            missing.append(case.case_id)
            refreshed.append(case)
        else:
            if image != case.image_sha256 or label != case.label_sha256:
                changed.append(case.case_id)
                refreshed.append(case)
            else:
                fingerprint = stat_fingerprint(case.files)
                if fingerprint != case.stat_sha256:
                    touched += 1
                refreshed.append(RegisteredCase(**{**case.__dict__, "stat_sha256": fingerprint}))
        if progress:
            progress(i + 1, len(registry.cases))
    new_files = _new_files(site, name, registry)
    if touched:
        updated = Registry(**{**registry.__dict__, "cases": tuple(refreshed)})
        _write_json(entry.registry, updated.to_json())
    return DriftReport(dataset=name, cases=len(registry.cases), unchanged=len(registry.cases) - len(changed) - len(missing),
                       changed=tuple(changed), missing=tuple(missing), touched=touched, new_files=new_files,
                       manifest_sha256=registry.manifest_sha256)


def _new_files(site, name: str, registry: Registry) -> int:
    if registry.source.get("kind") != "images":
        return 0
    from pipelines.ingest.scan import walk

    known = {f for c in registry.cases for f in c.files}
    path = dataset_dir(site.root, name) / "rejections.json"
    if path.is_file():
        try:
            known |= {r["path"] for r in json.loads(path.read_text(encoding="utf-8"))["rejections"]}
        except (ValueError, KeyError, TypeError):
            pass
    count = 0
    for root in (registry.source.get("images"), registry.source.get("labels")):
        if root and Path(root).is_dir():
            files, _ = walk(Path(root))
            count += sum(1 for f in files if f not in known)
    return count


# ------------------------------------------------------------------------------------------------ removal


def remove(site, name: str) -> dict[str, int]:
    """Forget a dataset: its site.yaml entry, its registry folder and the cache entries no other dataset uses.

    Source files are not touched; the privacy ledger keeps the dataset's spends (epsilon already spent stays spent).
    """
    import shutil

    from silo_agent.site import audit_site, drop_dataset_entry

    entry = site.dataset(name)
    registry = load_registry(entry.registry) if entry.registry is not None and entry.registry.is_file() else None
    removed_cache = 0
    if registry is not None:
        keep = set()
        for other in site.datasets.values():
            if other.name != name and other.registry is not None and other.registry.is_file():
                keep |= {c.content_sha256 for c in load_registry(other.registry).cases}
        for case in registry.cases:
            if case.content_sha256 in keep:
                continue
            for f in (site.cache_dir / case.content_sha256[:2]).glob(f"{case.content_sha256}-*.npz"):
                f.unlink()
                removed_cache += 1
    drop_dataset_entry(site, name)
    folder = dataset_dir(site.root, name)
    if folder.is_dir():
        shutil.rmtree(folder)
    details = {"task": entry.task, "cases": registry.counts["cases"] if registry else None, "cache_entries_removed": removed_cache}
    audit_site(site, EventType.DATASET_REMOVED, object={"type": "dataset", "id": name,
                                                        "sha256": registry.manifest_sha256 if registry else None}, details=details)
    return {"cases": details["cases"] or 0, "cache_entries_removed": removed_cache}
