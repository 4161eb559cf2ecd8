"""The models a site keeps and never sends: its personalized models (``training.personalize``).

Each lives in SITE_DIR/models/personalized-<sha256(run id)[:16]>.safetensors (tensors only; its metadata names the
run, the round and the plan hash) and was audited as ``state.saved`` with the SHA-256 of its tensors and its plan
hash when the silo agent saved it. Listing a model checks the file against that record: its tensors, its plan,
and that it is the file the agent saved for its run (a copy or a renamed file is not). Exporting checks the
audit log's hash chain first, then the bytes it writes, and that the plan builds a network those tensors fit; it
writes the layout of a coordinator run folder's model (``model.safetensors`` and the ``plan.yaml`` that builds its
network) and is audited as ``model.exported`` (a refused export too, as a failure).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compliance.records import EventType
from fedsilo.errors import ConfigError, VerificationError
from silo_agent.site import Site

PREFIX = "personalized-"


def personalized_model_path(site: Site, run_id: str) -> Path:
    """Where a site keeps its personalized model of a run (``training.personalize``); it is never sent."""
    return site.models_dir / f"{PREFIX}{hashlib.sha256(run_id.encode()).hexdigest()[:16]}.safetensors"


@dataclass(frozen=True)
class KeptModel:
    """A personalized model file and what the site's audit log says of it.

    ``integrity``: ``intact`` (the tensors, plan and place the silo agent recorded), ``CHANGED`` (``problem`` says
    what differs), ``not audited`` (no ``state.saved`` record names this run's model) or ``unreadable`` (not a
    safetensors file). ``figures``: the final evaluation's figures for this run (the global model's and the
    personalized model's, ``personalized-*``), from the site's ``dataset.used`` record, or empty."""

    path: Path
    run_id: str
    round: int | None
    plan_hash: str
    sha256: str
    integrity: str
    problem: str = ""
    saved_at: str | None = None
    lr_scale: float | None = None
    figures: dict[str, Any] = field(default_factory=dict)


def _read(blob: bytes) -> tuple[dict[str, str], str]:
    """A safetensors file's metadata and the SHA-256 of its tensors (``pipelines.serialization.state_digest``).

    The metadata is read from the format's header (8-byte little-endian length, then JSON) because
    ``safetensors.numpy.load`` returns tensors only and ``safe_open`` needs a file: reading the bytes once lets an
    export check exactly the bytes it writes."""
    from safetensors.numpy import load

    from pipelines.serialization import state_digest

    length = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + length]) if 0 < length <= len(blob) - 8 else None
    if not isinstance(header, dict):
        raise ValueError("no safetensors header")
    metadata = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in metadata.items()}, state_digest(load(blob))


def _judge(site: Site, path: Path, blob: bytes, saved: dict[str, dict], evaluated: dict[str, dict]) -> KeptModel:
    try:
        meta, digest = _read(blob)
    except Exception:  # safetensors and json raise their own error types for a truncated or foreign file
        return KeptModel(path=path, run_id="", round=None, plan_hash="", sha256="", integrity="unreadable",
                         problem="not a readable safetensors model")
    run_id, plan_hash, round_ = meta.get("run_id", ""), meta.get("plan_hash", ""), meta.get("round", "")
    record = saved.get(run_id)
    details = (record or {}).get("details") or {}
    problems = []
    if record is None:
        integrity = "not audited"
    else:
        if (record.get("object") or {}).get("sha256") != digest:
            problems.append("its tensors differ from those the silo agent saved")
        if details.get("plan_hash", plan_hash) != plan_hash:  # records older than the plan hash in them: not compared
            problems.append("it names another plan than the one it was trained with")
        if path.name != personalized_model_path(site, run_id).name:
            problems.append(f"it is not the file the silo agent saved for run {run_id}")
        integrity = "CHANGED" if problems else "intact"
    return KeptModel(path=path, run_id=run_id, round=int(round_) if round_.isdigit() else None, plan_hash=plan_hash,
                     sha256=digest, integrity=integrity, problem="; ".join(problems), saved_at=(record or {}).get("time"),
                     lr_scale=details.get("lr_scale"), figures=evaluated.get(run_id, {}))


def audit_log_present(site: Site) -> bool:
    return (site.audit_dir / "audit.sqlite").is_file()


def kept_models(site: Site) -> list[KeptModel]:
    """Every file in the site's models folder that looks like a personalized model, oldest saved first."""
    folder = site.models_dir
    paths = sorted(folder.glob(f"{PREFIX}*.safetensors")) if folder.is_dir() else []
    saved, evaluated = _audited(site)
    models = []
    for path in paths:
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read {path.name} in the site's models folder ({exc.strerror})",
                              fix=f"check the permissions of {folder}") from None
        models.append(_judge(site, path, blob, saved, evaluated))
    return sorted(models, key=lambda m: (m.saved_at or "", m.run_id, m.path.name))


def _audited(site: Site) -> tuple[dict[str, dict], dict[str, dict]]:
    """From the site's audit log: each run's last ``state.saved`` record of a personalized model, and each run's
    last final evaluation (a test-split ``dataset.used`` record that carries personalized figures)."""
    from compliance import AuditLog

    saved: dict[str, dict] = {}
    evaluated: dict[str, dict] = {}
    if not audit_log_present(site):
        return saved, evaluated
    with AuditLog.open(site.audit_dir, read_only=True) as log:
        for record in log.records():
            run_id = record.get("run_id")
            if record["event"] == EventType.STATE_SAVED and str((record.get("object") or {}).get("id", "")).startswith("personalized/"):
                saved[run_id] = record
            elif record["event"] == EventType.DATASET_USED:
                details = record.get("details") or {}
                if details.get("split") == "test" and any(k.startswith(PREFIX) for k in details):
                    evaluated[run_id] = {k: v for k, v in details.items() if k not in ("cases", "split", "seconds")}
    return saved, evaluated


def find_model(site: Site, run: str) -> KeptModel:
    """The kept model of the run whose id is ``run`` or starts with it."""
    models = [m for m in kept_models(site) if m.run_id]
    matches = [m for m in models if m.run_id == run] or [m for m in models if run and m.run_id.startswith(run)]
    if not matches:
        known = ", ".join(sorted({m.run_id for m in models})) or "none"
        raise ConfigError(f"site {site.site_id} keeps no personalized model of run '{run}' (kept: {known})",
                          fix="pick a run that 'fedsilo silo models list' shows")
    if len({m.run_id for m in matches}) > 1:
        raise ConfigError(f"'{run}' names the models of {len({m.run_id for m in matches})} runs", fix="give more of the run id")
    if len(matches) > 1:  # one run, several files: a copy; only the one the agent saved can be intact
        intact = [m for m in matches if m.integrity == "intact"]
        if len(intact) != 1:
            raise ConfigError(f"{len(matches)} files in the models folder name run {matches[0].run_id}: "
                              f"{', '.join(m.path.name for m in matches)}", fix="remove the copies; 'fedsilo silo models list' flags them")
        return intact[0]
    return matches[0]


def export_model(site: Site, model: KeptModel, out_dir: Path, *, actor: dict | None = None) -> list[Path]:
    """Copy a kept model to ``out_dir`` as ``model.safetensors`` with the approved ``plan.yaml`` that builds its
    network, after checking the site's audit log and the very bytes written; audited as ``model.exported``.
    Returns the files written. Nothing is overwritten, and a failed export leaves nothing behind."""
    from compliance import verify_log
    from silo_agent.site import audit_site

    if not audit_log_present(site):  # and no record of the refusal either: a new log would not be this site's
        raise VerificationError(f"the site's audit log is missing, so nothing vouches for the model of run {model.run_id}",
                                fix="restore SITE_DIR/audit from a backup")
    try:
        verify_log(site.audit_dir)  # the reference digests come from an intact hash chain
        saved, evaluated = _audited(site)
        blob = model.path.read_bytes()
        checked = _judge(site, model.path, blob, saved, evaluated)  # the bytes that will be written, not the listed ones
        if checked.integrity != "intact":
            why = checked.problem or checked.integrity
            raise VerificationError(f"the personalized model of run {model.run_id} is not exported: {why}",
                                    fix="export only models the silo agent saved; run the plan again to train a new one")
        plan_text = _plan_building(site, checked, blob)
    except VerificationError as exc:
        audit_site(site, EventType.MODEL_EXPORTED, actor=actor, object={"type": "model", "id": f"personalized/{model.run_id}", "sha256": None},
                   run_id=model.run_id or None, outcome="failure", reason=exc.one_line()[:300])
        raise
    except OSError as exc:
        raise ConfigError(f"cannot read the model of run {model.run_id} ({exc.strerror})", fix="check the site folder's permissions") from None
    return _write_export(site, checked, blob, plan_text, out_dir, actor)


def _plan_building(site: Site, model: KeptModel, blob: bytes) -> str:
    """The stored plan text of the model's run, checked to build a network the model's tensors fit."""
    from safetensors.numpy import load

    from pipelines.networks import build_network
    from silo_agent.approvals import load_stored, plans_dir

    if not (plans_dir(site) / f"{model.plan_hash}.yaml").is_file():
        raise ConfigError(f"the plan {model.plan_hash[:12]} of run {model.run_id} is no longer stored at this site",
                          fix="import the researcher's bundle again with 'fedsilo silo plan import FILE'")
    stored = load_stored(site, model.plan_hash)
    expected = {k: tuple(v.shape) for k, v in build_network(stored.plan).state_dict().items()}
    if {k: tuple(v.shape) for k, v in load(blob).items()} != expected:
        raise VerificationError(f"the tensors of run {model.run_id}'s model do not fit the network of plan {model.plan_hash[:12]}",
                                fix="export only models the silo agent saved")
    return stored.plan_text


def _write_export(site: Site, model: KeptModel, blob: bytes, plan_text: str, out_dir: Path, actor: dict | None) -> list[Path]:
    """Write both files beside their final names (exclusive creation), record the export, then rename them."""
    from silo_agent.site import audit_site

    targets = [out_dir / "model.safetensors", out_dir / "plan.yaml"]
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file", fix="choose a folder with --out")
    existing = [t.name for t in targets if t.exists()]
    if existing:
        raise ConfigError(f"{out_dir} already holds {', '.join(existing)}", fix="choose an empty or new folder with --out")
    partials = [t.with_name(t.name + ".partial") for t in targets]
    written: list[Path] = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for partial, data in zip(partials, (blob, plan_text.encode("utf-8"))):
            with open(partial, "xb") as f:
                written.append(partial)
                f.write(data)
        audit_site(site, EventType.MODEL_EXPORTED, actor=actor,
                   object={"type": "model", "id": f"personalized/{model.run_id}", "sha256": model.sha256},
                   run_id=model.run_id, details={"kind": "personalized model, exported within the site", "plan_hash": model.plan_hash})
        for partial, target in zip(partials, targets):
            if target.exists():  # appeared meanwhile: never overwritten
                raise ConfigError(f"{target} appeared during the export", fix="choose an empty or new folder with --out")
            partial.rename(target)
            written.remove(partial)
    except OSError as exc:
        raise ConfigError(f"cannot write the export into {out_dir} ({exc.strerror or type(exc).__name__})",
                          fix="choose a folder you can write to with --out") from None
    finally:
        for leftover in written:
            leftover.unlink(missing_ok=True)
    return targets


__all__ = ["KeptModel", "audit_log_present", "export_model", "find_model", "kept_models", "personalized_model_path"]
