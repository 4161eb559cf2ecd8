"""The silo's last updates, kept so that a retried round is answered without training (or spending) twice.

When the coordinator crashes after a silo trained round N of a run, the resumed run asks for round N
again with the same global model. The privacy ledger already holds that round's spend, so training
again would either spend twice or be refused as a replay. Instead the silo answers with the update it
already computed, from here: ``SITE_DIR/outbox/<run>/round-NNNN.safetensors`` (the weight delta as
tensors, never pickle; the metrics and the global model's digest in the header). A request for the
same run and round with a *different* global model is still refused as a replay.

An entry is written (atomically) after the ledger and before the reply leaves; only the last
:data:`KEEP` rounds per run are kept. With compressed updates the entry is the payload as sent, and the
run's top-k error-feedback residual after each round lives beside the entries (``residual-NNNN.safetensors``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

KEEP = 2


def _folder(site_root: Path, run_id: str) -> Path:
    return site_root / "outbox" / hashlib.sha256(run_id.encode()).hexdigest()[:16]


def save_update(site_root: Path, run_id: str, round_: int, global_sha256: str, delta: dict[str, np.ndarray],
                metrics: dict[str, float]) -> Path:
    from safetensors.numpy import save_file

    folder = _folder(site_root, run_id)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"round-{round_:04d}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file({k: np.array(v, order="C") for k, v in delta.items()}, str(tmp),  # keeps 0-d tensors 0-d
              metadata={"global_sha256": global_sha256, "metrics": json.dumps(metrics), "round": str(round_)})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in sorted(folder.glob("round-*.safetensors"))[:-KEEP]:
        old.unlink(missing_ok=True)
    return path


def load_update(site_root: Path, run_id: str, round_: int, global_sha256: str) -> tuple[dict[str, np.ndarray], dict[str, float]] | None:
    """The update sent for (run, round) from this global model, or None (never sent, pruned, or another model)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = _folder(site_root, run_id) / f"round-{round_:04d}.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
    if meta.get("global_sha256") != global_sha256:
        return None
    return load_file(str(path)), {k: float(v) for k, v in json.loads(meta.get("metrics", "{}")).items()}


def save_residual(site_root: Path, run_id: str, round_: int, residual: dict[str, np.ndarray]) -> None:
    """Top-k's error feedback after round ``round_`` of this run (what the silo's updates have not sent yet).

    One file per round, so that a round trained again (retried without DP, or after a blocked reply) starts
    from the residual the first attempt started from, not from one that already counts that attempt as sent.
    """
    from safetensors.numpy import save_file

    folder = _folder(site_root, run_id)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"residual-{round_:04d}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file({k: np.array(v, order="C") for k, v in residual.items()}, str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    for old in sorted(folder.glob("residual-*.safetensors"))[:-KEEP]:
        old.unlink(missing_ok=True)


def load_residual(site_root: Path, run_id: str, round_: int) -> dict[str, np.ndarray] | None:
    """The residual a round starts from: the one saved after the latest earlier round (None before the first)."""
    from safetensors.numpy import load_file

    folder = _folder(site_root, run_id)
    earlier = [p for p in sorted(folder.glob("residual-*.safetensors")) if int(p.stem.split("-")[1]) < round_]
    return load_file(str(earlier[-1])) if earlier else None
