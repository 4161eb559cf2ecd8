"""Read one case (image and optional label) through MONAI.

DICOM series folders and single DICOM files go through ``PydicomReader`` (no ITK needed);
NIfTI files through ``NibabelReader``. Both are oriented to RAS so that an image and its
label line up voxel for voxel. Only pixels and geometry come out: no header values, so no PHI.

A registered DICOM case is an explicit, ordered list of files (pipelines.ingest groups them by
SeriesInstanceUID and orders them along the slice normal): :func:`load_files` reads it through
:class:`SeriesReader`, a ``PydicomReader`` that stacks exactly those files in exactly that order
(MONAI's own reader takes a whole folder, which may hold several series, and orders by InstanceNumber).
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedsilo.errors import DataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def reader_name(path: Path) -> str:
    """The MONAI reader for a path: a folder or .dcm is DICOM, .nii/.nii.gz is NIfTI."""
    name = path.name.lower()
    if path.is_dir() or name.endswith(".dcm"):
        return "PydicomReader"
    if name.endswith(NIFTI_SUFFIXES):
        return "NibabelReader"
    raise DataError(f"{path}: not a DICOM folder, .dcm or NIfTI file", fix="point the datalist at a DICOM series folder or a .nii/.nii.gz file")


@functools.lru_cache(maxsize=None)
def _loader(reader: str):
    """LoadImaged + EnsureChannelFirstd for one reader (built once per process)."""
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    # MONAI's DICOM reader offers a GPU decoder plugin and warns on every read when CUDA is absent.
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    return Compose([LoadImaged(keys="image", reader=reader, image_only=True), EnsureChannelFirstd(keys="image")])


@functools.lru_cache(maxsize=None)
def _series_reader_class():
    """SeriesReader, built on first use (MONAI is a heavy import)."""
    import pydicom
    from monai.data import PydicomReader
    from monai.utils import ensure_tuple

    class SeriesReader(PydicomReader):
        """A PydicomReader for one series given as an ordered list of files (a single file: one image).

        MONAI stacks a series by InstanceNumber; the scan has already ordered the files along the slice
        normal, so each dataset's InstanceNumber is set, in memory only, to its place in that order.
        """

        def read(self, data, **kwargs):
            files = [str(f) for f in ensure_tuple(data)]
            options = {**self.kwargs, **kwargs}
            slices = [pydicom.dcmread(f, **options) for f in files]
            if len(slices) == 1:
                self.has_series = False
                self.filenames = files
                return slices[0]
            for i, ds in enumerate(slices):
                ds.InstanceNumber = i + 1
            self.has_series = True
            self.filenames = [files]
            return slices

    return SeriesReader


@functools.lru_cache(maxsize=None)
def _series_loader():
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged

    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    return Compose([LoadImaged(keys="image", reader=_series_reader_class()(), image_only=True), EnsureChannelFirstd(keys="image")])


def load_files(files: Sequence[str], fmt: str, *, spatial_dims: int) -> tuple[np.ndarray, np.ndarray]:
    """(channel-first RAS float32 array, 4x4 affine) for a registered image: ordered DICOM files, or one NIfTI file."""
    if fmt == "nifti":
        img, affine = _load(Path(files[0]))
        return _squeeze_to(img, spatial_dims, Path(files[0])), affine
    for f in files:
        if not Path(f).is_file():
            raise DataError(f"{f}: file not found", fix="check that the data drive is mounted, then run: fedsilo silo dataset check NAME")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reader warnings can quote header values
            item = _series_loader()({"image": list(files)})
            img = _orient(min(item["image"].ndim - 1, 3))(item)["image"]
    except Exception as exc:  # noqa: BLE001 - report the kind, never the text (it can quote header values)
        raise DataError(f"{files[0]}: the series cannot be decoded ({type(exc).__name__})",
                        fix="run: fedsilo silo dataset check NAME; re-export the series if it persists") from None
    arr = np.asarray(img, dtype=np.float32)
    return _squeeze_to(arr, spatial_dims, Path(files[0])), np.asarray(img.affine, dtype=np.float64)


def load_registered(image_files: Sequence[str], fmt: str, label_file: str | None, *, spatial_dims: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(image, affine, label mask or None) for a registered case; the label must match the image (shape, affine)."""
    img, affine = load_files(image_files, fmt, spatial_dims=spatial_dims)
    if label_file is None:
        return img, affine, None
    lab, lab_affine = _load(Path(label_file))
    lab = _squeeze_to(lab, spatial_dims, Path(label_file))
    _check_label(Path(label_file), img, affine, lab, lab_affine)
    return img, affine, (lab > 0.5).astype(np.float32)


def _check_label(label: Path, img: np.ndarray, affine: np.ndarray, lab: np.ndarray, lab_affine: np.ndarray) -> None:
    if lab.shape != img.shape:
        raise DataError(f"{label}: label shape {lab.shape[1:]} does not match image shape {img.shape[1:]}", fix="export the label on the image's grid")
    if not np.allclose(lab_affine, affine, atol=1e-3):
        raise DataError(f"{label}: label geometry (affine) does not match its image", fix="export the label in the image's space")


@functools.lru_cache(maxsize=None)
def _orient(spatial_dims: int):
    from monai.transforms import Orientationd

    return Orientationd(keys="image", axcodes="RAS"[:spatial_dims])


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(channel-first RAS array, 4x4 affine)."""
    if not path.exists():
        raise DataError(f"{path}: file or folder not found", fix="check the datalist paths and that the data drive is mounted")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # reader warnings can quote header values
            item = _loader(reader_name(path))({"image": str(path)})
            img = _orient(min(item["image"].ndim - 1, 3))(item)["image"]
    except DataError:
        raise
    except Exception as exc:  # MONAI wraps reader failures in many types; report the kind, not header values
        raise DataError(f"{path}: cannot be read ({type(exc).__name__})", fix="check the file is a complete DICOM or NIfTI image") from None
    return np.asarray(img, dtype=np.float32), np.asarray(img.affine, dtype=np.float64)


def load_case(image: Path, label: Path | None, *, spatial_dims: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Load an image (and a segmentation label) as float32 arrays of shape (1, *spatial).

    Raises DataError when the label's shape or affine does not match its image.
    """
    img, affine = _load(image)
    img = _squeeze_to(img, spatial_dims, image)
    if label is None:
        return img, None
    lab, lab_affine = _load(label)
    lab = _squeeze_to(lab, spatial_dims, label)
    _check_label(label, img, affine, lab, lab_affine)
    return img, (lab > 0.5).astype(np.float32)


def _squeeze_to(arr: np.ndarray, spatial_dims: int, path: Path) -> np.ndarray:
    while arr.ndim > spatial_dims + 1 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != spatial_dims + 1:
        raise DataError(f"{path}: has {arr.ndim - 1} spatial dimensions, the plan's task needs {spatial_dims}", fix="use a plan whose task matches the data (seg2d/cls2d or seg3d/cls3d)")
    return arr
