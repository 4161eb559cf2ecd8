"""Model tensors on disk and their fingerprints: safetensors only, never pickle.

``state_digest`` is the sha256 both sides put in their audit logs for an update or a model,
so the silo's record of what it sent and the coordinator's record of what it received can be
matched. It covers each tensor's name, dtype, shape and bytes, in sorted name order.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


def to_numpy(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Tensors or arrays -> contiguous numpy arrays (CPU), same names."""
    out = {}
    for name, value in state.items():
        arr = value.detach().cpu().numpy() if hasattr(value, "detach") else np.asarray(value)
        out[name] = np.ascontiguousarray(arr)
    return out


def state_digest(state: Mapping[str, Any]) -> str:
    """sha256 over (name, dtype, shape, little-endian bytes) of every tensor, sorted by name."""
    h = hashlib.sha256()
    for name, arr in sorted(to_numpy(state).items()):
        arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
        h.update(f"{name}\0{arr.dtype.str}\0{list(arr.shape)}\0".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def state_nbytes(state: Mapping[str, Any]) -> int:
    return int(sum(a.nbytes for a in to_numpy(state).values()))


def l2_norm(state: Mapping[str, Any]) -> float:
    """The L2 norm of all floating-point tensors taken as one vector."""
    total = 0.0
    for arr in to_numpy(state).values():
        if np.issubdtype(arr.dtype, np.floating):
            total += float(np.dot(arr.ravel().astype(np.float64), arr.ravel().astype(np.float64)))
    return math.sqrt(total)


def clip_to_norm(state: Mapping[str, Any], bound: float) -> tuple[dict[str, np.ndarray], bool]:
    """Scale the floating-point tensors so that their joint L2 norm is at most ``bound``; (state, whether it was scaled)."""
    arrays = to_numpy(state)
    norm = l2_norm(arrays)
    if norm <= bound:
        return arrays, False
    scale = bound / norm
    return {k: (v * scale).astype(v.dtype) if np.issubdtype(v.dtype, np.floating) else v for k, v in arrays.items()}, True


def save_model(path: Path, state: Mapping[str, Any], *, metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors as safetensors (atomic: temp file, then rename)."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    save_file(to_numpy(state), str(tmp), metadata=dict(metadata or {}))
    tmp.replace(path)


def load_model(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))
