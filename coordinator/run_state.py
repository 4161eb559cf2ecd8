"""The coordinator's run state on disk, written atomically at every round end, so a run can resume.

``RUN/state/`` holds, per completed round, ``round-NNNN.safetensors`` (the global model as
``model/<name>`` and the server optimizer's state as ``optimizer/<key>``: tensors only, never
pickle) and one pointer, ``run-state.json``, naming the latest file with its SHA-256, the model's
digest, the round rows so far and what the audit trail needs to continue (which node is which site,
how far each silo has witnessed the log). The pointer is replaced last (write, fsync, rename), so a
crash at any moment leaves either the previous round's state or this round's, never a mix; its
hashes go into the audit log (``state.saved``), and a resumed run checks them before it trusts a byte.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedsilo.errors import ConfigError, VerificationError

STATE_DIR = "state"
POINTER = "run-state.json"
FORMAT = "fedsilo-run-state/v1"
KEEP = 2  # round files kept: the latest and the one before (the pointer may still name it mid-write)


@dataclass
class RunSnapshot:
    """Everything a resumed run needs, as of the end of ``round``."""

    run_id: str
    plan_hash: str
    round: int
    global_state: dict[str, np.ndarray]
    optimizer_state: dict[str, np.ndarray]
    rounds: list[dict[str, Any]] = field(default_factory=list)
    node_site: dict[int, str] = field(default_factory=dict)
    witnessed_size: dict[str, int] = field(default_factory=dict)
    model_sha256: str = ""
    file_sha256: str = ""


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_replace(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_snapshot(out_dir: Path, snap: RunSnapshot) -> RunSnapshot:
    """Write ``snap`` under ``out_dir/state``; returns it with ``file_sha256`` and ``model_sha256`` filled in."""
    from safetensors.numpy import save_file

    from pipelines.serialization import state_digest

    folder = out_dir / STATE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    name = f"round-{snap.round:04d}.safetensors"
    # np.array, not np.ascontiguousarray: the latter turns 0-d arrays (the optimizer step) into 1-d ones.
    tensors = {f"model/{k}": np.array(v, order="C") for k, v in snap.global_state.items()}
    tensors.update({f"optimizer/{k}": np.array(v, order="C") for k, v in snap.optimizer_state.items()})
    tmp = folder / (name + ".tmp")
    save_file(tensors, str(tmp), metadata={"run_id": snap.run_id, "plan_hash": snap.plan_hash, "round": str(snap.round)})
    _fsync_replace(tmp, folder / name)
    snap.file_sha256 = _sha256_file(folder / name)
    snap.model_sha256 = state_digest(snap.global_state)
    pointer = {
        "format": FORMAT, "run_id": snap.run_id, "plan_hash": snap.plan_hash, "round": snap.round, "file": name,
        "sha256": snap.file_sha256, "model_sha256": snap.model_sha256, "rounds": snap.rounds,
        "node_site": {str(k): v for k, v in snap.node_site.items()}, "witnessed_size": snap.witnessed_size,
    }
    tmp = folder / (POINTER + ".tmp")
    tmp.write_text(json.dumps(pointer, indent=1), encoding="utf-8")
    _fsync_replace(tmp, folder / POINTER)
    for old in sorted(folder.glob("round-*.safetensors"))[:-KEEP]:
        old.unlink(missing_ok=True)
    return snap


def load_snapshot(run_dir: Path) -> RunSnapshot:
    """Read and check the latest run state of ``run_dir`` (file hash and model digest as recorded)."""
    from safetensors.numpy import load_file

    from pipelines.serialization import state_digest

    pointer_path = run_dir / STATE_DIR / POINTER
    if not pointer_path.is_file():
        raise ConfigError(f"{run_dir} holds no run state ({STATE_DIR}/{POINTER} missing)",
                          fix="give the run folder of a run that completed at least one round")
    try:
        pointer = json.loads(pointer_path.read_text(encoding="utf-8"))
        if pointer.get("format") != FORMAT:
            raise ValueError
        path = run_dir / STATE_DIR / str(pointer["file"])
        expected = str(pointer["sha256"])
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{pointer_path} is not a fedsilo run state", fix="resume from an intact run folder (restore it from backup)") from None
    if path.parent != run_dir / STATE_DIR or not path.is_file():
        raise ConfigError(f"{pointer_path} names a state file that is missing", fix="restore the run folder from backup")
    actual = _sha256_file(path)
    if actual != expected:
        raise VerificationError(f"{path.name}: SHA-256 {actual[:16]}... does not match the recorded {expected[:16]}...",
                                fix="the run state was altered or damaged: restore it from backup; do not resume from it")
    tensors = load_file(str(path))
    model = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    optimizer = {k[len("optimizer/"):]: v for k, v in tensors.items() if k.startswith("optimizer/")}
    digest = state_digest(model)
    if digest != pointer.get("model_sha256"):
        raise VerificationError(f"{path.name}: the model's digest does not match the recorded one", fix="restore the run folder from backup")
    return RunSnapshot(run_id=str(pointer["run_id"]), plan_hash=str(pointer["plan_hash"]), round=int(pointer["round"]),
                       global_state=model, optimizer_state=optimizer, rounds=list(pointer.get("rounds") or []),
                       node_site={int(k): str(v) for k, v in (pointer.get("node_site") or {}).items()},
                       witnessed_size={str(k): int(v) for k, v in (pointer.get("witnessed_size") or {}).items()},
                       model_sha256=digest, file_sha256=actual)
