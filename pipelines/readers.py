"""Read one case (image and optional label) through MONAI.

DICOM series folders and single DICOM files go through ``PydicomReader`` (no ITK needed);
NIfTI files through ``NibabelReader``. Both are oriented to RAS so that an image and its
label line up voxel for voxel. Only pixels and geometry come out: no header values, so no PHI.
"""

from __future__ import annotations

import functools
import logging
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
def _orient(spatial_dims: int):
    from monai.transforms import Orientationd

    return Orientationd(keys="image", axcodes="RAS"[:spatial_dims])


def _load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(channel-first RAS array, 4x4 affine)."""
    if not path.exists():
        raise DataError(f"{path}: file or folder not found", fix="check the datalist paths and that the data drive is mounted")
    try:
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
    if lab.shape != img.shape:
        raise DataError(f"{label}: label shape {lab.shape[1:]} does not match image shape {img.shape[1:]}", fix="export the label on the image's grid")
    if not np.allclose(lab_affine, affine, atol=1e-3):
        raise DataError(f"{label}: label geometry (affine) does not match its image", fix="export the label in the image's space")
    return img, (lab > 0.5).astype(np.float32)


def _squeeze_to(arr: np.ndarray, spatial_dims: int, path: Path) -> np.ndarray:
    while arr.ndim > spatial_dims + 1 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != spatial_dims + 1:
        raise DataError(f"{path}: has {arr.ndim - 1} spatial dimensions, the plan's task needs {spatial_dims}", fix="use a plan whose task matches the data (seg2d/cls2d or seg3d/cls3d)")
    return arr
