"""NIfTI-1/2 header scan (.nii, .nii.gz): shape, spacing, affine and a content hash, without decoding the voxels.

The header is read with nibabel (lazily: no voxel data is loaded). The file is read once in chunks
to hash it and, for gzip, to count the decompressed bytes, so a truncated or corrupt file is caught
here rather than at training: a complete file holds at least vox_offset + prod(shape) x itemsize
bytes (NIfTI-1 standard, https://nifti.nimh.nih.gov/nifti-1, fields vox_offset, dim, bitpix).
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zlib

import numpy as np

from pipelines.ingest.dicom import Rejection
from pipelines.ingest.series import ImageSource

NIFTI_SUFFIXES = (".nii", ".nii.gz")
_CHUNK = 1 << 20


def is_nifti(name: str) -> bool:
    return name.lower().endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in (".nii.gz", ".nii"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _hash_and_size(path: str) -> tuple[str, int]:
    """(sha256 of the file's bytes, decompressed length for .gz or the file length). Raises zlib.error/OSError."""
    h = hashlib.sha256()
    gz = path.lower().endswith(".gz")
    inflater = zlib.decompressobj(wbits=31) if gz else None
    total = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            if inflater is None:
                total += len(chunk)
                continue
            while chunk:
                total += len(inflater.decompress(chunk))
                chunk = inflater.unused_data
                if chunk:  # a second gzip member
                    inflater = zlib.decompressobj(wbits=31)
        if inflater is not None:
            total += len(inflater.flush())
            if not inflater.eof:
                raise zlib.error("truncated gzip stream")
    return h.hexdigest(), total


def scan_nifti(path: str, identity: str) -> ImageSource | Rejection:
    """The image's geometry and content hash, or why it cannot be used. ``identity`` is the caller's raw case identity."""
    import nibabel as nib

    try:
        st = os.stat(path)
        digest, length = _hash_and_size(path)
    except OSError as exc:
        return Rejection(path, "unreadable", f"cannot be read ({type(exc).__name__})")
    except zlib.error:
        return Rejection(path, "corrupt", "corrupt NIfTI file (the gzip stream is damaged or truncated)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img = nib.load(path)
            header = img.header
            shape = tuple(int(d) for d in img.shape)
            affine = np.asarray(img.affine, dtype=np.float64)
            itemsize = np.dtype(header.get_data_dtype()).itemsize
            offset = int(getattr(img.dataobj, "offset", 0) or 0)  # where the voxels start, as nibabel will read them
            zooms = tuple(float(z) for z in header.get_zooms())
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a bad header; its text is not shown
        return Rejection(path, "corrupt", f"corrupt NIfTI header ({type(exc).__name__})")
    if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
        return Rejection(path, "not-image-file", f"not a NIfTI image ({type(img).__name__})")
    if length < offset + int(np.prod(shape, dtype=np.int64)) * itemsize:
        return Rejection(path, "corrupt", "truncated NIfTI file: it holds fewer voxels than its header declares")
    if not np.isfinite(affine).all():
        return Rejection(path, "geometry", "the NIfTI affine (qform/sform) is not finite")
    spatial = list(shape)
    while len(spatial) > 2 and spatial[-1] == 1:
        spatial.pop()
    if len(spatial) > 3:
        return Rejection(path, "task", f"a {len(spatial)}D NIfTI ({'x'.join(map(str, shape))}): only 2D or 3D images are used")
    if len(spatial) < 2 or min(spatial) < 1:
        return Rejection(path, "geometry", f"NIfTI of shape {shape}: not a 2D or 3D image")
    return ImageSource(format="nifti", files=(path,), sha256=(digest,), stats=((st.st_size, st.st_mtime_ns),), identity=identity,
                       series_uid=None, shape=tuple(spatial), spacing=tuple(zooms[: len(spatial)]),
                       affine=tuple(tuple(float(v) for v in row) for row in affine))
