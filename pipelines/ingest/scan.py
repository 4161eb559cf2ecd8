"""From what a PACS export or a research drive holds to cases and a rejection list.

Three ways in:

* :func:`scan_images` - a folder (or file, or DICOMDIR) of DICOM and/or NIfTI images, with optional labels:
  a folder of NIfTI masks (segmentation) or a CSV of classes (classification).
* :func:`scan_datalist` - a MONAI Decathlon-style datalist JSON (the split is kept).

Every file under the given path ends up in exactly one case or in the rejection list with one reason.
Nothing is copied, written or changed at the source; files are only opened for reading.

Pairing labels with images (segmentation): an image's *key* is its path relative to ``--images``
without the extension; for a DICOM series, the folder that holds it. A label's key is its path
relative to ``--labels`` without ``.nii``/``.nii.gz``. Keys match exactly, or by their last component
when that is unique, and an nnU-Net channel suffix ``_0000`` on an image is ignored. A label must
match its image's shape exactly and its affine within :data:`AFFINE_ATOL_MM`.

Classification CSV: a header row with an ``image`` (or ``case``) column holding the image key and a
``label`` (or ``class``) column holding a class number 0..K-1, or a class name when ``classes`` names them.
"""

from __future__ import annotations

import csv
import multiprocessing
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fedsilo.errors import ConfigError, DataError
from pipelines.ingest.dicom import DicomHeader, Rejection, dicomdir_files, scan_file
from pipelines.ingest.nifti import is_nifti, scan_nifti, strip_nifti_suffix
from pipelines.ingest.series import ImageSource, assemble_series

#: A label's affine may differ from its image's by this much (mm, any entry of the 4x4 matrix).
AFFINE_ATOL_MM = 1e-3
#: With workers > 1, below this many files the scan still runs in this process (a pool costs more than it saves).
PARALLEL_MIN_FILES = 2000
_OTHER_FORMATS = {".mnc": "MINC", ".par": "Philips PAR/REC", ".rec": "Philips PAR/REC", ".hdr": "Analyze", ".img": "Analyze",
                  ".mgz": "FreeSurfer MGH", ".mgh": "FreeSurfer MGH", ".head": "AFNI", ".brik": "AFNI", ".nrrd": "NRRD",
                  ".mha": "MetaImage", ".mhd": "MetaImage"}

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ScannedCase:
    """One usable case. ``image.identity``/``image.series_uid`` are raw: hash them before storing anything."""

    key: str
    image: ImageSource
    label: ImageSource | None = None
    label_class: int | None = None
    split: str | None = None


@dataclass(frozen=True)
class ScanResult:
    cases: tuple[ScannedCase, ...]
    rejections: tuple[Rejection, ...]
    files_seen: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    def rejection_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.rejections:
            counts[r.kind] = counts.get(r.kind, 0) + 1
        return dict(sorted(counts.items()))


def spatial_dims(task: str) -> int:
    return 3 if task.endswith("3d") else 2


# ------------------------------------------------------------------------------------------------ file walk


def walk(root: Path) -> tuple[list[str], list[Rejection]]:
    """Every file under ``root`` (sorted, symlinks to files followed, folders not) and a rejection per empty folder."""
    files: list[str] = []
    empty: list[Rejection] = []
    for folder, dirs, names in os.walk(root, onerror=None, followlinks=False):
        dirs.sort()
        if not dirs and not names:
            empty.append(Rejection(folder, "empty-folder", "empty folder"))
        for name in sorted(names):
            files.append(os.path.join(folder, name))
    return files, empty


def _scan_one(path: str):
    """Worker: a DicomHeader, a Rejection, ("dicomdir", path), or ("nifti", path) for the parent to scan."""
    name = os.path.basename(path)
    if is_nifti(name):
        return ("nifti", path)
    result = scan_file(path)
    if isinstance(result, Rejection) and result.kind == "not-image-file":
        ext = os.path.splitext(name)[1].lower()
        if ext in _OTHER_FORMATS:
            return Rejection(path, "not-image-file", f"{_OTHER_FORMATS[ext]} file: not DICOM or NIfTI (convert it to NIfTI)")
    return result


def _map(paths: list[str], workers: int | None, progress: Progress | None, offset: int = 0, total: int | None = None) -> list:
    total = total if total is not None else len(paths)
    workers = workers if workers is not None else 1  # measured: one process parses ~5,000 headers/s (fedsilo bench ingest)
    out: list = []
    if workers <= 1 or len(paths) < PARALLEL_MIN_FILES or "fork" not in multiprocessing.get_all_start_methods():
        for i, p in enumerate(paths):
            out.append(_scan_one(p))
            if progress and (i % 64 == 63 or i == len(paths) - 1):
                progress(offset + i + 1, total)
        return out
    # fork: the workers inherit the imported modules, so they start in milliseconds.
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for i, result in enumerate(pool.imap(_scan_one, paths, chunksize=256)):
            out.append(result)
            if progress and (i % 64 == 63 or i == len(paths) - 1):
                progress(offset + i + 1, total)
    return out


@dataclass
class _Found:
    headers: list[DicomHeader] = field(default_factory=list)
    nifti: list[str] = field(default_factory=list)
    rejections: list[Rejection] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    indexed: int = 0  # files read because a DICOMDIR named them (outside the walked folder)


def _collect(paths: list[str], workers: int | None, progress: Progress | None) -> _Found:
    found = _Found()
    dicomdirs: list[str] = []
    for result in _map(paths, workers, progress):
        if isinstance(result, DicomHeader):
            found.headers.append(result)
        elif isinstance(result, Rejection):
            found.rejections.append(result)
        elif result[0] == "dicomdir":
            dicomdirs.append(result[1])
        else:
            found.nifti.append(result[1])
    listed = set(paths)
    for index in dicomdirs:
        try:
            referenced, missing = dicomdir_files(index)
        except Exception as exc:  # noqa: BLE001 - a damaged index is reported, its files were walked anyway
            found.rejections.append(Rejection(index, "corrupt", f"DICOMDIR index cannot be parsed ({type(exc).__name__})"))
            continue
        outside = [p for p in referenced if p not in listed]
        found.rejections.append(Rejection(index, "index", f"DICOMDIR index of {len(referenced) + missing} file(s); "
                                          "the files it lists are scanned themselves"))
        if missing:
            found.notes.append(f"{index}: the DICOMDIR lists {missing} file(s) that are not there")
        if outside:  # only when --images named the DICOMDIR itself
            sub = _collect(sorted(outside), workers, None)
            found.indexed += len(outside) + sub.indexed
            found.headers += sub.headers
            found.nifti += sub.nifti
            found.rejections += sub.rejections
            found.notes += sub.notes
    return found


# ------------------------------------------------------------------------------------------------ keys


def _rel(path: str, root: Path) -> str:
    try:
        return Path(path).relative_to(root).as_posix()
    except ValueError:
        return Path(path).name


def _image_keys(image: ImageSource, root: Path) -> list[str]:
    """The names a label (or a CSV row) may give an image, most specific first.

    NIfTI: its path under ``root`` without the extension. A DICOM file that is a whole image (one slice,
    or a multi-frame object): its path without ``.dcm``, then its folder. A series: its folder ("." at the root).
    """
    if image.format == "nifti":
        return [strip_nifti_suffix(_rel(image.files[0], root))]
    parents = {str(Path(f).parent) for f in image.files}
    folder = os.path.commonpath(sorted(parents)) if parents else str(root)
    rel = _rel(folder, root) if Path(folder) != root else ""
    if len(image.files) == 1:
        name = _rel(image.files[0], root)
        return [name[:-4] if name.lower().endswith(".dcm") else name] + ([rel] if rel else [])
    return [rel or "."]


def _scan_images_only(images: Path, task: str, workers: int | None, progress: Progress | None) -> tuple[list[ImageSource], list[Rejection], int, list[str]]:
    if not images.exists():
        raise DataError(f"{images}: not found", fix="check the path and that the data drive is mounted")
    if images.is_dir():
        paths, empty = walk(images)
    else:
        paths, empty = [str(images)], []
    found = _collect(paths, workers, progress)
    dicom_images, rejected = assemble_series(found.headers, spatial_dims=spatial_dims(task))
    nifti_images = []
    root = images if images.is_dir() else images.parent
    for path in found.nifti:
        result = scan_nifti(path, "nifti:" + _rel(path, root))
        if isinstance(result, Rejection):
            rejected.append(result)
        elif result.spatial_dims != spatial_dims(task):
            rejected.append(Rejection(path, "task", f"a {result.spatial_dims}D image: the task {task} needs {spatial_dims(task)}D images"))
        else:
            nifti_images.append(result)
    return dicom_images + nifti_images, empty + found.rejections + rejected, len(paths) + found.indexed, found.notes


# ------------------------------------------------------------------------------------------------ labels


def label_mismatch(image: ImageSource, label: ImageSource) -> str | None:
    """Why a segmentation label does not fit its image (shape exact, affine within AFFINE_ATOL_MM), or None."""
    if label.shape != image.shape:
        return f"label shape {'x'.join(map(str, label.shape))} does not match image shape {'x'.join(map(str, image.shape))}"
    if image.affine is None:
        return "the image has no position/orientation (ImagePositionPatient, ImageOrientationPatient) to match a label against"
    a, b = np.asarray(label.affine), np.asarray(image.affine)
    if image.spatial_dims == 2:  # a 2D label's slice axis is free (MONAI puts 1.0 there for one DICOM slice)
        a, b = a[:, [0, 1, 3]], b[:, [0, 1, 3]]
    if not np.allclose(a, b, atol=AFFINE_ATOL_MM, rtol=0):
        worst = float(np.max(np.abs(a - b)))
        return f"label geometry (affine) differs from its image by up to {worst:.3g} mm"
    return None


def _scan_label(path: str, root: Path, task: str) -> ImageSource | Rejection:
    if not is_nifti(path):
        return Rejection(path, "label", "a segmentation label must be a NIfTI file (.nii or .nii.gz)")
    result = scan_nifti(path, "label:" + _rel(path, root))
    if isinstance(result, ImageSource) and result.spatial_dims != spatial_dims(task):
        return Rejection(path, "label", f"a {result.spatial_dims}D label: the task {task} needs {spatial_dims(task)}D labels")
    return result


def _reject_case(image: ImageSource, kind: str, reason: str) -> list[Rejection]:
    return [Rejection(f, kind, reason) for f in image.files]


def _pair_segmentation(images: list[ImageSource], images_root: Path, labels: Path | None, task: str) -> tuple[list[ScannedCase], list[Rejection], int]:
    if labels is None:
        raise ConfigError(f"a {task} dataset needs --labels (a folder of NIfTI masks)", fix="add --labels PATH")
    if not labels.exists():
        raise DataError(f"{labels}: not found", fix="check the labels path")
    label_paths, rejected = walk(labels) if labels.is_dir() else ([str(labels)], [])
    label_root = labels if labels.is_dir() else labels.parent
    by_key: dict[str, ImageSource] = {}
    for path in label_paths:
        result = _scan_label(path, label_root, task)
        if isinstance(result, Rejection):
            rejected.append(result)
        else:
            by_key[strip_nifti_suffix(_rel(path, label_root))] = result
    by_name: dict[str, list[str]] = {}
    for key in by_key:
        by_name.setdefault(key.rsplit("/", 1)[-1], []).append(key)
    single = labels.is_file() and len(images) == 1
    matches = [(image, _image_keys(image, images_root)) for image in images]
    matches = [(image, keys, _match_key(keys, by_key, by_name, single)) for image, keys in matches]
    claims: dict[str, int] = {}
    for _, _, label_key in matches:
        if label_key is not None:
            claims[label_key] = claims.get(label_key, 0) + 1
    cases, used = [], set()
    for image, keys, label_key in matches:
        if label_key is None:
            rejected += _reject_case(image, "no-label", f"no label found for this image (expected {labels / keys[0]}.nii.gz)")
            continue
        used.add(label_key)
        if claims[label_key] > 1:
            rejected += _reject_case(image, "no-label", f"{claims[label_key]} images match the label '{label_key}' (several series in "
                                     "one folder?): it cannot be given to one; give each series its own folder")
            continue
        label = by_key[label_key]
        problem = label_mismatch(image, label)
        if problem:
            rejected += _reject_case(image, "label", f"{problem} ({label.files[0]})")
            rejected.append(Rejection(label.files[0], "label", f"{problem} ({image.files[0]})"))
            continue
        cases.append(ScannedCase(key=label_key, image=image, label=label))
    for key, label in by_key.items():
        if key in used and claims.get(key, 0) > 1:
            rejected.append(Rejection(label.files[0], "label", f"{claims[key]} images match this label: it cannot be given to one"))
        elif key not in used:
            rejected.append(Rejection(label.files[0], "label", "label with no matching image"))
    return cases, rejected, len(label_paths)


def _match_key(keys: list[str], by_key: dict, by_name: dict, single: bool) -> str | None:
    """The label key for an image's candidate keys: an exact match first, then a unique last-component match."""
    if single and len(by_key) == 1:
        return next(iter(by_key))
    candidates = [k for key in keys for k in (key, key[:-5] if key.endswith("_0000") else None) if k]
    for candidate in candidates:
        if candidate in by_key:
            return candidate
    for candidate in candidates:
        names = by_name.get(candidate.rsplit("/", 1)[-1], [])
        if len(names) == 1:
            return names[0]
    return None


def read_class_csv(path: Path, classes: tuple[str, ...] | None) -> tuple[dict[str, int], list[str]]:
    """{image key: class} from a CSV, and problems (by row number, never quoting a cell)."""
    if not path.is_file():
        raise DataError(f"{path}: no such CSV file", fix="give --labels the CSV of image keys and classes")
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
            header = [h.strip().lower() for h in (rows[0].keys() if rows else [])]
    except (UnicodeDecodeError, csv.Error):
        raise DataError(f"{path}: not a readable CSV file", fix="save it as UTF-8 CSV with a header row") from None
    key_col = next((c for c in ("image", "case") if c in header), None)
    label_col = next((c for c in ("label", "class") if c in header), None)
    if not rows or key_col is None or label_col is None:
        raise DataError(f"{path}: needs a header row with an 'image' (or 'case') column and a 'label' (or 'class') column",
                        fix="write the CSV as: image,label")
    names = {n: i for i, n in enumerate(classes or ())}
    out: dict[str, int] = {}
    problems: list[str] = []
    for number, row in enumerate(rows, start=2):
        row = {(k or "").strip().lower(): (v or "").strip() for k, v in row.items()}
        key = row.get(key_col, "").strip().strip("/")
        value = row.get(label_col, "")
        if value in names:
            cls = names[value]
        elif value.isdigit():
            cls = int(value)
        else:
            problems.append(f"{path} row {number}: the label is not a class number" + (" or class name" if names else ""))
            continue
        if names and cls >= len(names):
            problems.append(f"{path} row {number}: class {cls} is outside the {len(names)} classes given")
            continue
        key = key[:-4] if key.lower().endswith(".dcm") else strip_nifti_suffix(key)
        if key in out and out[key] != cls:
            problems.append(f"{path} row {number}: a second, different class for the same image")
            continue
        out[key] = cls
    return out, problems


def _pair_classes(images: list[ImageSource], images_root: Path, labels: Path | None, classes: tuple[str, ...] | None,
                  task: str) -> tuple[list[ScannedCase], list[Rejection], list[str]]:
    if labels is None:
        raise ConfigError(f"a {task} dataset needs --labels (a CSV of image keys and classes)", fix="add --labels FILE.csv")
    table, notes = read_class_csv(labels, classes)
    by_name: dict[str, list[str]] = {}
    for key in table:
        by_name.setdefault(key.rsplit("/", 1)[-1], []).append(key)
    cases, rejected, used = [], [], set()
    for image in images:
        keys = _image_keys(image, images_root)
        match = _match_key(keys, {k: None for k in table}, by_name, False)
        if match is None:
            rejected += _reject_case(image, "no-label", f"no class for this image in {labels} (expected a row for '{keys[0]}')")
            continue
        used.add(match)
        cases.append(ScannedCase(key=match, image=image, label_class=table[match]))
    unused = len(set(table) - used)
    if unused:
        notes.append(f"{labels}: {unused} row(s) name no image that was found")
    return cases, rejected, notes


# ------------------------------------------------------------------------------------------------ entry points


def scan_images(images: Path, *, task: str, labels: Path | None = None, classes: tuple[str, ...] | None = None,
                workers: int | None = None, progress: Progress | None = None) -> ScanResult:
    """Scan a folder, file or DICOMDIR of images (and labels) into cases and rejections."""
    images = Path(images)
    found, rejected, seen, notes = _scan_images_only(images, task, workers, progress)
    root = images if images.is_dir() else images.parent
    if task.startswith("seg"):
        cases, more, label_files = _pair_segmentation(found, root, Path(labels) if labels else None, task)
        seen += label_files
    else:
        cases, more, csv_notes = _pair_classes(found, root, Path(labels) if labels else None, classes, task)
        notes += csv_notes
    return ScanResult(cases=tuple(cases), rejections=tuple(rejected + more), files_seen=seen, notes=tuple(notes))


def scan_datalist(datalist: Path, *, task: str, workers: int | None = None, progress: Progress | None = None) -> ScanResult:
    """Scan every entry of a MONAI Decathlon-style datalist; each entry is one case or rejected (its split is kept)."""
    from pipelines.dataset import SPLITS, read_datalist

    data = read_datalist(datalist)
    root = datalist.parent
    entries = [(split, i, item) for split in SPLITS for i, item in enumerate(data.get(split) or [])]
    seg = task.startswith("seg")
    cases: list[ScannedCase] = []
    rejected: list[Rejection] = []
    notes: list[str] = []
    seen = 0
    total = len(entries)
    for n, (split, i, item) in enumerate(entries):
        if progress and n:
            progress(n, total)
        where = f"datalist entry {split}[{i}]"
        image_rel = item.get("image") if isinstance(item, dict) else None
        if not isinstance(image_rel, str) or not image_rel:
            rejected.append(Rejection(str(datalist), "datalist", f"{where}: no 'image' path"))
            continue
        image_path = root / image_rel
        if not image_path.exists():
            rejected.append(Rejection(str(image_path), "datalist", f"{where}: image not found"))
            continue
        images, problems, files, more_notes = _scan_images_only(image_path, task, workers, None)
        seen += files
        notes += more_notes
        rejected += problems
        if len(images) != 1:
            for image in images:
                rejected += _reject_case(image, "datalist", f"{where}: the folder holds {len(images)} images; an entry must be one series or file")
            if not images and not problems:
                rejected.append(Rejection(str(image_path), "datalist", f"{where}: no image found"))
            continue
        image = images[0]
        if image.format == "nifti":
            image = ImageSource(**{**image.__dict__, "identity": "nifti:" + _rel(image.files[0], root)})
        key = strip_nifti_suffix(image_rel)
        label = item.get("label")
        if seg:
            if not isinstance(label, str) or not label:
                rejected += _reject_case(image, "no-label", f"{where}: no 'label' path for a segmentation task")
                continue
            seen += 1
            result = _scan_label(str(root / label), root, task) if (root / label).is_file() else \
                Rejection(str(root / label), "no-label", f"{where}: label not found")
            if isinstance(result, Rejection):
                rejected.append(result)
                rejected += _reject_case(image, "no-label", f"{where}: its label cannot be used ({result.reason})")
                continue
            problem = label_mismatch(image, result)
            if problem:
                rejected += _reject_case(image, "label", f"{where}: {problem}")
                rejected.append(Rejection(result.files[0], "label", f"{where}: {problem}"))
                continue
            cases.append(ScannedCase(key=key, image=image, label=result, split=split))
        else:
            if isinstance(label, bool) or not isinstance(label, int) or label < 0:
                rejected += _reject_case(image, "no-label", f"{where}: the class must be a whole number >= 0")
                continue
            cases.append(ScannedCase(key=key, image=image, label_class=label, split=split))
    if progress and total:
        progress(total, total)
    return ScanResult(cases=tuple(cases), rejections=tuple(rejected), files_seen=seen, notes=tuple(notes))

