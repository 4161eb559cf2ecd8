"""DICOM files to image volumes: group by SeriesInstanceUID, order slices, check the geometry.

One volume is one series (PS3.3 C.7.3): files are grouped by SeriesInstanceUID and two series are
never stacked. Slices are ordered by their position along the slice normal, the cross product of
the two ImageOrientationPatient direction cosines (PS3.3 C.7.6.2.1.1; the same ordering as
nibabel's DICOM orientation notes, https://nipy.org/nibabel/dicom/dicom_orientation.html), not by
InstanceNumber. A series is rejected when its slices differ in size, orientation or pixel spacing,
when two slices share a position (a duplicate or a second phase/echo), when slices are missing
(a gap of about k times the usual spacing), when the spacing is uneven, or when the positions do not
run along the normal (gantry tilt). A multi-frame object is a volume by itself.

The affine is the one MONAI's ``PydicomReader(affine_lps_to_ras=True, swap_ij=True)`` derives, so a
NIfTI label exported on the image's grid matches it (voxel axis 0 along the row direction, 1 along
the column direction, 2 along the slices; RAS).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from pipelines.ingest.dicom import DicomHeader, Rejection

#: Slice spacings may differ by this fraction of the median spacing (plus SPACING_ATOL_MM) before a
#: series counts as unevenly spaced; positions closer than SAME_POSITION_MM are the same slice.
SPACING_RTOL = 0.01
SPACING_ATOL_MM = 1e-3
SAME_POSITION_MM = 1e-3
#: Orientation cosines and pixel spacings of one series must agree to this tolerance.
ORIENTATION_ATOL = 1e-4
PIXEL_SPACING_ATOL_MM = 1e-4
#: A slice may sit this fraction of the slice step off the line through the first slice along the normal.
DRIFT_FRACTION = 0.1


@dataclass(frozen=True)
class ImageSource:
    """One image as the loader will read it: its files in order and the geometry the scan derived.

    ``identity`` and ``series_uid`` are raw (a UID or a relative path): in memory only; the registry
    stores keyed hashes of them. ``shape`` is the spatial shape as MONAI loads it (before orientation).
    """

    format: str  # "dicom" or "nifti"
    files: tuple[str, ...]
    sha256: tuple[str, ...]
    stats: tuple[tuple[int, int], ...]  # (size, mtime_ns) per file
    identity: str
    series_uid: str | None
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    affine: tuple[tuple[float, ...], ...] | None

    @property
    def spatial_dims(self) -> int:
        return len(self.shape)


def monai_affine(orientation, position, pixel_spacing, last_position=None, n: int = 1) -> np.ndarray:
    """The 4x4 RAS affine of MONAI's PydicomReader for a slice stack (first and last ImagePositionPatient)."""
    r = np.asarray(orientation[:3], dtype=np.float64)
    c = np.asarray(orientation[3:], dtype=np.float64)
    dr, dc = pixel_spacing if pixel_spacing is not None else (1.0, 1.0)
    a = np.eye(4)
    a[:3, 0] = c * dr
    a[:3, 1] = r * dc
    a[:3, 2] = (0.0, 0.0, 1.0)
    a[:3, 3] = position
    if last_position is not None and n > 1:
        a[:3, 2] = (np.asarray(last_position, dtype=np.float64) - np.asarray(position, dtype=np.float64)) / (n - 1)
    a[0, :] *= -1  # LPS -> RAS
    a[1, :] *= -1
    return a @ np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float64)  # swap_ij


def _affine_tuple(a: np.ndarray | None) -> tuple[tuple[float, ...], ...] | None:
    return None if a is None else tuple(tuple(float(v) for v in row) for row in a)


def _reject_all(headers: list[DicomHeader], kind: str, reason: str) -> list[Rejection]:
    return [Rejection(h.path, kind, reason) for h in headers]


def assemble_series(headers: list[DicomHeader], *, spatial_dims: int) -> tuple[list[ImageSource], list[Rejection]]:
    """Group headers by series and turn each series (or multi-frame object) into one ImageSource."""
    by_series: dict[str, list[DicomHeader]] = defaultdict(list)
    for h in headers:
        by_series[h.series_uid].append(h)
    images: list[ImageSource] = []
    rejected: list[Rejection] = []
    for uid in sorted(by_series, key=lambda u: min(h.path for h in by_series[u])):
        group = sorted(by_series[uid], key=lambda h: h.path)
        multi = [h for h in group if h.frames > 1]
        if multi and len(multi) != len(group):
            rejected += _reject_all(group, "geometry", "series mixes multi-frame and single-frame objects")
            continue
        results = [_multiframe(h, spatial_dims) for h in multi] if multi else [_stack(uid, group, spatial_dims)]
        for image, problems in results:
            rejected += problems
            if image is not None:
                images.append(image)
    return images, rejected


def _multiframe(h: DicomHeader, spatial_dims: int) -> tuple[ImageSource | None, list[Rejection]]:
    if spatial_dims == 2:
        return None, [Rejection(h.path, "task", f"multi-frame object ({h.frames} frames): a 2D task needs single-frame images")]
    spacing_z = h.slice_thickness or 1.0
    affine = None
    if h.frame_positions and len(h.frame_positions) == h.frames and h.orientation is not None:
        positions = np.asarray(h.frame_positions)
        problem, step = _check_positions(positions, np.asarray(h.orientation))
        if problem:
            return None, [Rejection(h.path, "geometry", f"multi-frame object: {problem}")]
        spacing_z = step
        affine = monai_affine(h.orientation, positions[0], h.pixel_spacing, positions[-1], h.frames)
    elif h.orientation is not None and h.position is not None:
        affine = monai_affine(h.orientation, h.position, h.pixel_spacing)
        affine[:3, 2] *= spacing_z
    ps = h.pixel_spacing or (1.0, 1.0)
    return ImageSource(format="dicom", files=(h.path,), sha256=(h.sha256,), stats=((h.size, h.mtime_ns),),
                       identity=f"dicom-frames:{h.series_uid}:{h.sop_uid}", series_uid=h.series_uid,
                       shape=(h.columns, h.rows, h.frames), spacing=(ps[1], ps[0], float(spacing_z)), affine=_affine_tuple(affine)), []


def _check_positions(positions: np.ndarray, orientation: np.ndarray) -> tuple[str | None, float]:
    """(problem or None, slice step in mm) for slice positions in the given order (sorted along the normal)."""
    normal = np.cross(orientation[:3], orientation[3:])
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        return "ImageOrientationPatient row and column directions are parallel", 0.0
    normal = normal / norm
    d = positions @ normal
    order = np.argsort(d, kind="stable")
    d = d[order]
    diffs = np.diff(d)
    if np.any(diffs < SAME_POSITION_MM):
        return f"{int(np.sum(diffs < SAME_POSITION_MM))} slice(s) share a position with another (duplicate slice, or several phases or echoes in one series)", 0.0
    step = float(np.median(diffs))
    gaps = diffs > 1.5 * step
    if np.any(gaps):
        missing = int(np.sum(np.rint(diffs[gaps] / step) - 1))
        return f"{max(missing, 1)} slice(s) missing (gap in ImagePositionPatient along the slice normal)", step
    if np.max(np.abs(diffs - step)) > SPACING_RTOL * step + SPACING_ATOL_MM:
        return f"uneven slice spacing ({float(diffs.min()):.3g} to {float(diffs.max()):.3g} mm)", step
    offsets = positions[order] - positions[order][0]
    along = offsets @ normal
    drift = np.linalg.norm(offsets - np.outer(along, normal), axis=1)
    if np.max(drift) > max(DRIFT_FRACTION * step, 10 * SPACING_ATOL_MM):
        return "slices do not stack along the slice normal (gantry tilt or mixed stacks)", step
    return None, step


def _stack(uid: str, group: list[DicomHeader], spatial_dims: int) -> tuple[ImageSource | None, list[Rejection]]:
    rejected: list[Rejection] = []
    seen: dict[str, DicomHeader] = {}
    unique = []
    for h in group:
        if h.sop_uid and h.sop_uid in seen:
            rejected.append(Rejection(h.path, "duplicate", f"duplicate of {seen[h.sop_uid].path} (same SOPInstanceUID)"))
            continue
        seen[h.sop_uid] = h
        unique.append(h)
    group = unique
    if len({(h.rows, h.columns) for h in group}) > 1:
        return None, rejected + _reject_all(group, "geometry", "slices of one series differ in size (Rows/Columns)")
    first = group[0]
    if len(group) == 1:
        if spatial_dims == 3:
            return None, rejected + [Rejection(first.path, "task", "a single slice: a 3D task needs a series of slices (or a multi-frame volume)")]
        affine = monai_affine(first.orientation, first.position, first.pixel_spacing) if first.orientation and first.position else None
        ps = first.pixel_spacing or (1.0, 1.0)
        image = ImageSource(format="dicom", files=(first.path,), sha256=(first.sha256,), stats=((first.size, first.mtime_ns),),
                            identity=f"dicom-series:{uid}", series_uid=uid, shape=(first.columns, first.rows),
                            spacing=(ps[1], ps[0]), affine=_affine_tuple(affine))
        return image, rejected
    if spatial_dims == 2:
        return None, rejected + _reject_all(group, "task", f"series of {len(group)} slices: a 2D task needs single images")
    if any(h.orientation is None for h in group):
        return None, rejected + _reject_all(group, "geometry", "ImageOrientationPatient missing: slices cannot be ordered")
    if any(h.position is None for h in group):
        return None, rejected + _reject_all(group, "geometry", "ImagePositionPatient missing: slices cannot be ordered")
    orientations = np.asarray([h.orientation for h in group])
    if np.max(np.abs(orientations - orientations[0])) > ORIENTATION_ATOL:
        return None, rejected + _reject_all(group, "geometry", "slices of one series differ in ImageOrientationPatient")
    spacings = np.asarray([h.pixel_spacing or (1.0, 1.0) for h in group])
    if np.max(np.abs(spacings - spacings[0])) > PIXEL_SPACING_ATOL_MM:
        return None, rejected + _reject_all(group, "geometry", "slices of one series differ in PixelSpacing")
    positions = np.asarray([h.position for h in group])
    problem, step = _check_positions(positions, orientations[0])
    if problem:
        return None, rejected + _reject_all(group, "geometry", problem)
    normal = np.cross(orientations[0][:3], orientations[0][3:])
    order = np.argsort(positions @ normal, kind="stable")
    ordered = [group[i] for i in order]
    affine = monai_affine(first.orientation, ordered[0].position, first.pixel_spacing, ordered[-1].position, len(ordered))
    ps = first.pixel_spacing or (1.0, 1.0)
    image = ImageSource(format="dicom", files=tuple(h.path for h in ordered), sha256=tuple(h.sha256 for h in ordered),
                        stats=tuple((h.size, h.mtime_ns) for h in ordered), identity=f"dicom-series:{uid}", series_uid=uid,
                        shape=(first.columns, first.rows, len(ordered)), spacing=(ps[1], ps[0], step), affine=_affine_tuple(affine))
    return image, rejected

