"""The models a site keeps and never sends: its personalized models (``training.personalize``).

Each lives in SITE_DIR/models/personalized-<sha256(run id)[:16]>.safetensors (tensors only; its metadata names the
run, the round and the plan hash) and was audited as ``state.saved`` with the SHA-256 of its tensors when the silo
agent saved it. Listing a model checks its tensors against that record, and so does exporting it: a model
changed on disk since is reported, and not exported. An export writes the layout of a coordinator run folder's
model (``model.safetensors`` and the ``plan.yaml`` that builds its network) and is audited as ``model.exported``.
"""

from __future__ import annotations

import hashlib
import shutil
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
    """A personalized model on disk and what the site's audit log says of it.

    ``audited_sha256``: the digest its ``state.saved`` record holds (None: no record names this run's model);
    ``figures``: the final evaluation's figures for this run (the global model's and the personalized model's,
    ``personalized-*``), from the site's ``dataset.used`` record, or empty when none was recorded."""

    path: Path
    run_id: str
    round: int | None
    plan_hash: str
    sha256: str
    audited_sha256: str | None
    saved_at: str | None
    lr_scale: float | None
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def integrity(self) -> str:
        """``intact`` (the tensors the audit log recorded), ``CHANGED`` (not those) or ``not audited``."""
        if self.audited_sha256 is None:
            return "not audited"
        return "intact" if self.audited_sha256 == self.sha256 else "CHANGED"


def kept_models(site: Site) -> list[KeptModel]:
    """Every personalized model in the site's models folder, oldest saved first."""
    from safetensors import safe_open

    from pipelines.serialization import load_model, state_digest

    folder = site.models_dir
    paths = sorted(folder.glob(f"{PREFIX}*.safetensors")) if folder.is_dir() else []
    saved, evaluated = _audited(site)
    models = []
    for path in paths:
        try:
            with safe_open(str(path), "np") as f:
                meta = f.metadata() or {}
            digest = state_digest(load_model(path))
        except Exception:  # safetensors raises its own error types for a truncated or foreign file
            raise ConfigError(f"{path.name} in the site's models folder is not a readable safetensors model",
                              fix=f"move it out of {folder}") from None
        run_id = meta.get("run_id", "")
        record = saved.get(run_id, {})
        round_ = meta.get("round")
        models.append(KeptModel(path=path, run_id=run_id, round=int(round_) if round_ and round_.isdigit() else None,
                                plan_hash=meta.get("plan_hash", ""), sha256=digest,
                                audited_sha256=(record.get("object") or {}).get("sha256"), saved_at=record.get("time"),
                                lr_scale=(record.get("details") or {}).get("lr_scale"), figures=evaluated.get(run_id, {})))
    return sorted(models, key=lambda m: (m.saved_at or "", m.run_id))


def _audited(site: Site) -> tuple[dict[str, dict], dict[str, dict]]:
    """From the site's audit log: each run's last ``state.saved`` record of a personalized model, and each run's
    last final evaluation (a test-split ``dataset.used`` record that carries personalized figures)."""
    from compliance import AuditLog

    saved: dict[str, dict] = {}
    evaluated: dict[str, dict] = {}
    if not (site.audit_dir / "audit.sqlite").is_file():
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
    models = kept_models(site)
    matches = [m for m in models if m.run_id == run] or [m for m in models if run and m.run_id.startswith(run)]
    if not matches:
        known = ", ".join(m.run_id for m in models) or "none"
        raise ConfigError(f"site {site.site_id} keeps no personalized model of run '{run}' (kept: {known})",
                          fix="pick a run that 'fedsilo silo models list' shows")
    if len(matches) > 1:
        raise ConfigError(f"'{run}' names the models of {len(matches)} runs", fix="give more of the run id")
    return matches[0]


def export_model(site: Site, model: KeptModel, out_dir: Path, *, actor: dict | None = None) -> list[Path]:
    """Copy a kept model to ``out_dir`` as ``model.safetensors`` with the approved ``plan.yaml`` that builds its
    network, after checking its tensors against the audit log; audited as ``model.exported``. Returns the files
    written. Nothing is overwritten."""
    from silo_agent.approvals import load_stored, plans_dir
    from silo_agent.site import audit_site

    if model.integrity != "intact":
        why = ("its tensors differ from those the silo agent saved" if model.integrity == "CHANGED"
               else "the site's audit log has no record of it being saved")
        raise VerificationError(f"the personalized model of run {model.run_id} is not exported: {why}",
                                fix="export only models the silo agent saved; run the plan again to train a new one")
    if not (plans_dir(site) / f"{model.plan_hash}.yaml").is_file():
        raise ConfigError(f"the plan {model.plan_hash[:12]} of run {model.run_id} is no longer stored at this site",
                          fix="import the researcher's bundle again with 'fedsilo silo plan import FILE'")
    plan_text = load_stored(site, model.plan_hash).plan_text
    targets = [out_dir / "model.safetensors", out_dir / "plan.yaml"]
    existing = [t.name for t in targets if t.exists()]
    if existing:
        raise ConfigError(f"{out_dir} already holds {', '.join(existing)}", fix="choose an empty or new folder with --out")
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"{out_dir} is a file", fix="choose a folder with --out")
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model.path, targets[0])
    targets[1].write_text(plan_text, encoding="utf-8")
    audit_site(site, EventType.MODEL_EXPORTED, actor=actor,
               object={"type": "model", "id": f"personalized/{model.run_id}", "sha256": model.sha256},
               run_id=model.run_id, details={"kind": "personalized model, exported within the site", "plan_hash": model.plan_hash})
    return targets


__all__ = ["KeptModel", "export_model", "find_model", "kept_models", "personalized_model_path"]
