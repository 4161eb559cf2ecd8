"""A site's cases as arrays, behind a persistent preprocessing cache.

Two ways in:

* :func:`load_cases` - registered cases (:class:`CaseSource`, built by the silo's registry from a scan):
  each case's decoded, RAS-oriented pixels (and its affine: the geometry, no header values) are cached as
  ``.npz`` under the case's *content hash* (sha256 over its files' bytes, taken at registration), so a
  second epoch, round or plan reads the cache instead of decoding DICOM again. Before a case is used,
  its files' sizes and modification times are checked against the registration (a stat, no read): a
  changed source is a DataError pointing at ``fedsilo silo dataset check``.
* :func:`load_split` - a MONAI Decathlon-style datalist (``{"training": [{"image": ..., "label": ...}],
  "test": [...]}``, paths relative to the datalist), cached under a key from the source files' paths,
  sizes and modification times (kept for notebooks and the pooled baseline).

The cache holds pixels, masks and affines only (numpy, ``allow_pickle=False``).
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
from pipelines.readers import load_case, load_registered

SPLITS = ("training", "test")
CACHE_VERSION = "v2"


@dataclass(frozen=True)
class CaseSource:
    """A registered case, as the loader needs it.

    Attributes:
        content_sha256: sha256 over the case's files (image in order, then label); the cache key.
        image_format: "dicom" (ordered slice files, or one file) or "nifti" (one file).
        image_files: the image's files, in slice order.
        label_file: the segmentation mask (NIfTI), or None.
        label_class: the class (classification), or None.
        stat_sha256: :func:`stat_fingerprint` of all the case's files at registration (None: not checked).
    """

    content_sha256: str
    image_format: str
    image_files: tuple[str, ...]
    label_file: str | None = None
    label_class: int | None = None
    stat_sha256: str | None = None

    @property
    def files(self) -> tuple[str, ...]:
        return self.image_files + ((self.label_file,) if self.label_file else ())


def case_content_hash(image_sha256: tuple[str, ...], label_sha256: str | None) -> str:
    """sha256 over the image files' hashes in slice order, then the label's: the case's content and its cache key."""
    text = "case-v1\n" + "\n".join(image_sha256) + f"\nlabel:{label_sha256 or '-'}\n"
    return hashlib.sha256(text.encode()).hexdigest()


def stat_fingerprint(files: tuple[str, ...] | list[str], stats: list[tuple[int, int]] | None = None) -> str:
    """sha256 over each file's path, size and mtime (from ``stats`` or os.stat): changes when a file is replaced or edited."""
    h = hashlib.sha256(b"stat-v1\n")
    for i, f in enumerate(files):
        if stats is None:
            st = os.stat(f)
            size, mtime = st.st_size, st.st_mtime_ns
        else:
            size, mtime = stats[i]
        h.update(f"{f}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def _check_sources(case: CaseSource) -> None:
    for f in case.files:
        if not os.path.isfile(f):
            raise DataError(f"{f}: a registered source file is missing",
                            fix="mount the data drive, or run: fedsilo silo dataset check NAME and register the dataset again")
    if case.stat_sha256 is not None and stat_fingerprint(case.files) != case.stat_sha256:
        raise DataError(f"{case.image_files[0]}: the source files of a registered case changed since registration",
                        fix="run: fedsilo silo dataset check NAME (it re-hashes and reports what changed), then register the dataset again")


def _cache_entry(cache_dir: Path, case: CaseSource, spatial_dims: int) -> Path:
    key = case.content_sha256
    return cache_dir / key[:2] / f"{key}-{spatial_dims}d-{CACHE_VERSION}.npz"


def _save(entry: Path, arrays: dict[str, np.ndarray]) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f"{entry.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, entry)


def load_registered_case(case: CaseSource, *, spatial_dims: int, cache_dir: Path | None) -> tuple[np.ndarray, np.ndarray | None]:
    """(image (1, *spatial) float32, mask or None) for one registered case, decoded at most once per cache."""
    _check_sources(case)
    entry = _cache_entry(cache_dir, case, spatial_dims) if cache_dir is not None else None
    if entry is not None and entry.is_file():
        with np.load(entry, allow_pickle=False) as z:
            return z["image"], (z["label"].astype(np.float32) if "label" in z.files else None)
    img, affine, lab = load_registered(case.image_files, case.image_format, case.label_file, spatial_dims=spatial_dims)
    if entry is not None:
        arrays = {"image": img, "affine": affine}
        if lab is not None:
            arrays["label"] = lab.astype(np.uint8)
        _save(entry, arrays)
    return img, lab


def load_cases(
    cases: list[CaseSource],
    *,
    task: str,
    cache_dir: Path | None = None,
    num_classes: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> CaseArrays:
    """Stack registered cases into (images, labels), decoding each case at most once per cache."""
    if not cases:
        raise DataError("the split has no registered cases", fix="register a dataset with cases in this split")
    spatial_dims = 3 if task.endswith("3d") else 2
    segmentation = task.startswith("seg")
    images, labels = [], []
    for i, case in enumerate(cases):
        if not segmentation:
            cls = case.label_class
            if isinstance(cls, bool) or not isinstance(cls, int) or not 0 <= cls < num_classes:
                raise DataError(f"{case.image_files[0]}: registered class {cls!r} is not among the plan's {num_classes} classes",
                                fix=f"classes must be whole numbers 0..{num_classes - 1}: set data.num_classes in the plan or fix the labels")
        img, lab = load_registered_case(case, spatial_dims=spatial_dims, cache_dir=cache_dir)
        if segmentation:
            if lab is None:
                raise DataError(f"{case.image_files[0]}: the case has no label", fix="register the dataset with --labels")
            labels.append(lab.astype(np.float32))
        else:
            labels.append(case.label_class)
        images.append(img)
        if progress:
            progress(i + 1, len(cases))
    return _stack(images, labels, segmentation=segmentation, what="the registered cases")


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
    return _stack(images, labels, segmentation=segmentation, what=f"{datalist}: cases")


def _stack(images: list, labels: list, *, segmentation: bool, what: str) -> CaseArrays:
    """One split's cases as arrays; cases of different shapes cannot be batched."""
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise DataError(f"{what} have {len(shapes)} different shapes", fix="add a Resize or SpatialPad transform to the plan")
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
