"""A site's cases as arrays: datalist in, (images, labels) out, behind a persistent cache.

The datalist is MONAI Decathlon-style JSON (``{"training": [{"image": ..., "label": ...}],
"test": [...]}``, paths relative to the datalist). Decoding DICOM is the slow part, so each
case's decoded, RAS-oriented pixels are cached as ``.npz`` (numpy, ``allow_pickle=False``)
under a key derived from the source files' paths, sizes and modification times; a second
epoch, round or plan reads the cache instead of decoding again. The cache holds pixels only.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedsilo.errors import DataError
from pipelines.readers import load_case

SPLITS = ("training", "test")


@dataclass(frozen=True)
class CaseArrays:
    """Stacked cases of one split.

    images: float32 (N, 1, *spatial). labels: float32 (N, 1, *spatial) masks for
    segmentation, int64 (N,) classes for classification.
    """

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])


def read_datalist(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"no datalist at {path}", fix="register the dataset again or check the site folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{path}: not valid JSON", fix="regenerate the datalist") from None
    if not isinstance(data, dict) or not isinstance(data.get("training"), list):
        raise DataError(f"{path}: no 'training' list", fix="use the MONAI Decathlon datalist layout")
    return data


def _source_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]


def cache_key(image: Path, label: Path | None, spatial_dims: int) -> str:
    """sha256 over each source file's path, size and mtime: changes when a source changes."""
    h = hashlib.sha256(f"v1:{spatial_dims}".encode())
    for source in (image, label):
        if source is None:
            continue
        for f in _source_files(source):
            st = f.stat()
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _load_cached(image: Path, label: Path | None, spatial_dims: int, cache_dir: Path | None) -> tuple[np.ndarray, np.ndarray | None]:
    if cache_dir is None:
        return load_case(image, label, spatial_dims=spatial_dims)
    if not image.exists():
        raise DataError(f"{image}: file or folder not found", fix="check the datalist paths and that the data drive is mounted")
    key = cache_key(image, label, spatial_dims)
    entry = cache_dir / key[:2] / f"{key}.npz"
    if entry.is_file():
        with np.load(entry, allow_pickle=False) as z:
            return z["image"], (z["label"] if "label" in z.files else None)
    img, lab = load_case(image, label, spatial_dims=spatial_dims)
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_suffix(f".{os.getpid()}.tmp.npz")
    arrays = {"image": img} if lab is None else {"image": img, "label": lab.astype(np.uint8)}
    np.savez(tmp, **arrays)
    os.replace(tmp, entry)
    return img, lab


def load_split(
    datalist: Path,
    split: str,
    *,
    task: str,
    cache_dir: Path | None = None,
    num_classes: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> CaseArrays:
    """Load every case of ``split`` from a datalist, decoding each case at most once per cache."""
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'", fix=f"use one of: {', '.join(SPLITS)}")
    entries = read_datalist(datalist).get(split) or []
    if not entries:
        raise DataError(f"{datalist}: the '{split}' split is empty", fix="register a dataset with cases in this split")
    root = datalist.parent
    spatial_dims = 3 if task.endswith("3d") else 2
    segmentation = task.startswith("seg")
    images, labels = [], []
    for i, item in enumerate(entries):
        image = root / item["image"]
        if segmentation:
            img, lab = _load_cached(image, root / item["label"], spatial_dims, cache_dir)
            labels.append(lab.astype(np.float32))
        else:
            img, _ = _load_cached(image, None, spatial_dims, cache_dir)
            cls = item.get("label")
            if isinstance(cls, bool) or not isinstance(cls, int) or not 0 <= cls < num_classes:
                raise DataError(f"{datalist}: case {i} of '{split}' has class {cls!r}", fix=f"classes must be whole numbers 0..{num_classes - 1}")
            labels.append(cls)
        images.append(img)
        if progress:
            progress(i + 1, len(entries))
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise DataError(f"{datalist}: cases have {len(shapes)} different shapes", fix="add a Resize or SpatialPad transform to the plan")
    stacked_labels = np.stack(labels) if segmentation else np.asarray(labels, dtype=np.int64)
    return CaseArrays(images=np.stack(images), labels=stacked_labels)


def apply_transforms(arrays: CaseArrays, transform: Callable[[dict], dict], *, segmentation: bool) -> CaseArrays:
    """Apply a deterministic dictionary transform to every case (once, at load)."""
    images, labels = [], []
    for i in range(len(arrays)):
        item = {"image": arrays.images[i]}
        if segmentation:
            item["label"] = arrays.labels[i]
        out = transform(item)
        images.append(np.asarray(out["image"], dtype=np.float32))
        if segmentation:
            labels.append(np.asarray(out["label"], dtype=np.float32))
    return CaseArrays(images=np.stack(images), labels=np.stack(labels) if segmentation else arrays.labels)
