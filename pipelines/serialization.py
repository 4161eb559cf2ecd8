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


def read_npy(blob: bytes, *, max_elements: int) -> np.ndarray:
    """Decode one untrusted .npy payload: the header is read and checked before anything is allocated.

    ``np.load`` allocates the shape a header claims before reading the data, so a 100-byte payload claiming
    2**40 entries would exhaust memory; here a header is refused (ValueError) unless its dtype holds no
    objects, it has at most ``max_elements`` entries, and the payload holds exactly their bytes.
    """
    import io

    f = io.BytesIO(blob)
    try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
    except Exception as exc:  # noqa: BLE001 - any malformed header is one refusal
        raise ValueError(f"not a valid .npy header ({type(exc).__name__})") from None
    if dtype.hasobject:
        raise ValueError("the .npy payload holds Python objects")
    count = math.prod(shape)
    if count > max_elements:
        raise ValueError(f"the .npy header claims {count} entries, at most {max_elements} are allowed")
    data = blob[f.tell():]
    if len(data) != count * dtype.itemsize:
        raise ValueError(f"the .npy payload holds {len(data)} bytes, its header needs {count * dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order="F" if fortran else "C").copy()


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
