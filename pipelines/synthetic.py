"""Synthetic hospitals: real DICOM series and NIfTI labels, for the demo, the docs and the tests.

``fedsilo synth DIR --silos 3`` calls :func:`write_synthetic_federation`, which writes one folder per silo::

    DIR/hospital0/
        datalist.json                 MONAI Decathlon-style list, paths relative to the silo folder, no PHI
        images/case-0000/slice-000.dcm ...   one DICOM series per case (3D: one file per slice; 2D: one file)
        labels/case-0000.nii.gz       segmentation tasks only: uint8 mask (0/1), same grid as the image

Images come from :func:`monai.data.synthetic.create_test_image_3d` / ``create_test_image_2d`` (spheres/discs
of intensity 0.5..1 on uniform background noise, rescaled to [0, 1]), with a ``numpy.random.RandomState``
seeded from the silo profile and the case index, so the same profile always gives the same pixels, UIDs and PHI.

Pixel encoding (documented contract, also in the datalist's ``"modality"``):

* ``CT`` (default): signed 16-bit stored values ``round(image * intensity_scale * 1000)`` with
  ``RescaleSlope 1`` and ``RescaleIntercept -1024``, so readers that apply the rescale (MONAI's
  ``PydicomReader`` does) see Hounsfield-like units from -1024 (background) to about +976.
* ``MR``: unsigned 12-bit stored values ``round(image * intensity_scale * 1000)`` (clipped to 4095), no rescale.

Geometry: ``ImageOrientationPatient`` is ``[1,0,0,0,1,0]`` (axial), slices move along +z by ``SliceThickness``
(= ``SpacingBetweenSlices``), ``InstanceNumber`` = slice index + 1. The label NIfTI carries exactly the affine
that MONAI's ``PydicomReader`` (``affine_lps_to_ras=True``, ``swap_ij=True``) derives for the series, and its
array is laid out like the array that reader returns, so::

    Compose([LoadImaged("image", reader="PydicomReader"), LoadImaged("label", reader="NibabelReader"),
             EnsureChannelFirstd(["image", "label"]), Orientationd(["image", "label"], axcodes="RAS")])

gives image and label of identical shape and affine, voxel for voxel aligned (3D: (1, size, size, size); the
series folder holds exactly one series, so the z extent is ``size``).

2D tasks: the datalist "image" is still the case folder, holding one file (``slice-000.dcm``); PydicomReader
reads a one-file folder as a single 2D image, (1, size, size) after EnsureChannelFirstd, with a 4x4 affine
whose slice axis is 1.0 (as MONAI builds it). The label is a 2D NIfTI of shape (size, size) with that same
affine, so the same chain works with no extra transform; use ``axcodes="RA"`` for 2D (``"RAS"`` also works
but MONAI warns that axcodes is longer than the spatial rank).

Classification (``cls3d``/``cls2d``): within each split, even positions (0, 2, 4, ...) are label 1 (the image
contains the profile's objects) and odd positions are label 0 (``num_objs=0``: background noise only, scaled
back to the silo's noise amplitude so that the classes differ by the objects, not by background brightness).
The class is stored as an int in the datalist; no label files are written. A split needs >= 2 cases to hold
both classes.

PHI: every case gets plausible fake identifiers in its DICOM headers (PatientName, PatientID "MRN...",
PatientBirthDate, AccessionNumber "ACC...", StudyDate, ReferringPhysicianName, InstitutionName) and a free-text
ImageComments that repeats the name and MRN, as technologists' notes do. Every such
value is returned in :attr:`SyntheticSilo.planted_phi` so that de-identification and egress tests can search
outputs for them. Dates are digits only (``YYYYMMDD``): when scanning raw bytes, beware that long numeric UIDs
can contain any 8-digit string by chance; search tag values, or search the non-numeric values only.
The datalist never contains PHI (case ids are ``case-0000``..., not derived from PHI).

Speed: one template dataset is built and encoded (by pydicom's element writer) per case; per slice only
SOPInstanceUID (and the file meta's copy), InstanceNumber, ImagePositionPatient, SliceLocation and PixelData are
encoded, and each file is assembled from the pre-encoded chunks. Every file is byte-identical to pydicom's
``save_as(..., enforce_file_format=True)`` of the dataset read back (a test checks this). The demo federation
(3 silos, 120/180/240 cases of 32^3, 17,280 DICOM files) takes about 8 s of writing on an idle 2-core machine,
plus about 4 s to import MONAI; creating the files is kernel time and varies with the machine's load.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_data_element, write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from fedsilo.errors import ConfigError

__all__ = [
    "DEFAULT_SIZE",
    "MODALITIES",
    "TASKS",
    "SiloProfile",
    "SyntheticSilo",
    "default_profiles",
    "write_synthetic_federation",
    "write_synthetic_silo",
]

TASKS: tuple[str, ...] = ("seg3d", "seg2d", "cls3d", "cls2d")
MODALITIES: tuple[str, ...] = ("CT", "MR")
#: Image edge length used when ``size`` is None: 32^3 volumes for 3D tasks, 64^2 images for 2D tasks.
DEFAULT_SIZE: dict[str, int] = {"seg3d": 32, "cls3d": 32, "seg2d": 64, "cls2d": 64}
MIN_SIZE = 16
MAX_SIZE = 512

_CT_INTERCEPT = -1024
_MR_MAX = 4095  # 12 bits stored
_SCALE = 1000.0  # stored value per unit of (image * intensity_scale)

_FIRST_NAMES = ("JANE", "JOHN", "MARIA", "AHMED", "LI", "OLGA", "PIERRE", "AYESHA", "KENJI", "SOFIA",
                "DAVID", "FATIMA", "LUCAS", "ANNA", "KWAME", "INGRID")
_LAST_NAMES = ("DOE", "ROE", "SMITH", "GARCIA", "NGUYEN", "MULLER", "OKAFOR", "ROSSI", "TANAKA", "NOVAK",
               "SILVA", "JENSEN", "KOWALSKI", "HASSAN", "LEVI", "MORENO")
_INSTITUTIONS = ("St. Example General Hospital", "Riverside Example Medical Center",
                 "Northfield Example University Hospital", "Lakeside Example Clinic")
_STUDY_DESCRIPTIONS = {"CT": ("CT ABDOMEN W/O CONTRAST", "CT CHEST ROUTINE", "CT PELVIS"),
                       "MR": ("MR BRAIN T1", "MR KNEE PD", "MR ABDOMEN T2")}
_PIXEL_SPACINGS = (1.0, 1.25, 0.8, 0.9, 1.1)
_UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's root: these UIDs are generate_uid(entropy_srcs=...)


@dataclass(frozen=True)
class SiloProfile:
    """How one synthetic hospital's data looks (non-IID knobs).

    Attributes:
        name: folder and datalist name, e.g. "hospital0".
        n_train: training cases.
        n_test: test cases.
        intensity_scale: multiplies image intensities (scanner differences); stored value = image * scale * 1000.
        noise: background noise amplitude passed to ``create_test_image_*`` as ``noise_max`` (MONAI draws it
            uniformly from [0, noise)); 0 <= noise < 1.
        num_objects: objects (spheres/discs) per image (cls: per positive image).
        radius_max: max object radius in voxels at size 32 (scaled with the image size, capped to fit).
        seed: base seed; case i uses RandomState([seed, i, ...]).
        pixel_spacing: in-plane spacing in mm (PixelSpacing, both directions).
        slice_thickness: slice spacing in mm (SliceThickness = SpacingBetweenSlices).
        modality: "CT" (signed 16-bit + rescale to HU) or "MR" (unsigned 12-bit).
        institution: InstitutionName in the headers; None derives "St. Example General Hospital <name>".
    """

    name: str
    n_train: int
    n_test: int
    intensity_scale: float
    noise: float
    num_objects: int
    radius_max: int
    seed: int
    pixel_spacing: float = 1.0
    slice_thickness: float = 1.0
    modality: str = "CT"
    institution: str | None = None


@dataclass(frozen=True)
class SyntheticSilo:
    """What :func:`write_synthetic_silo` wrote.

    Attributes:
        name: the profile's name.
        root: ``out_dir/<name>``.
        datalist: ``root/datalist.json``.
        n_train: training cases written.
        n_test: test cases written.
        planted_phi: every PHI value written into this silo's DICOM headers (sorted, unique).
        task: the task written ("seg3d", "seg2d", "cls3d", "cls2d").
        modality: "CT" or "MR".
        size: image edge length in voxels.
    """

    name: str
    root: Path
    datalist: Path
    n_train: int
    n_test: int
    planted_phi: tuple[str, ...]
    task: str = "seg3d"
    modality: str = "CT"
    size: int = 32


# --------------------------------------------------------------------------------------------- profiles


def _spread(lo: float, hi: float, n: int, i: int) -> float:
    return lo if n == 1 else lo + (hi - lo) * i / (n - 1)


def _profile_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(index), 0x5117]).generate_state(1)[0])


def default_profiles(n_silos: int = 3, *, seed: int = 0, sizes: Sequence[int] | None = None) -> list[SiloProfile]:
    """Non-IID profiles for ``n_silos`` hospitals.

    Intensity scale spreads over 0.6..2.0, noise over 0.1..0.5, objects over 2..6, radius over 6..10 voxels,
    and slice thickness over 1.0..2.0 mm, each knob rotated by one silo so that the silos differ in several
    directions at once; pixel spacing cycles 1.0, 1.25, 0.8, 0.9, 1.1 mm. Total cases spread over 120..240
    (3 silos: 120, 180, 240), of which ``min(20, max(1, total // 5))`` are test cases (20 for the defaults).
    ``sizes`` overrides the totals (one per silo, each >= 2). All default silos are CT; build a
    :class:`SiloProfile` with ``modality="MR"`` for MR. Same arguments, same profiles (seeds included).
    """
    if isinstance(n_silos, bool) or not isinstance(n_silos, int) or n_silos < 1:
        raise ConfigError(f"silos must be an integer >= 1, got {n_silos!r}", fix="pass silos=1 or more")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ConfigError(f"seed must be an integer >= 0, got {seed!r}", fix="pass seed=0 or another whole number")
    if sizes is not None:
        sizes = list(sizes)
        if len(sizes) != n_silos:
            raise ConfigError(f"sizes has {len(sizes)} entries for {n_silos} silos",
                              fix="give one total case count per silo")
        for s in sizes:
            if isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 2:
                raise ConfigError(f"sizes entries must be integers >= 2 (one train and one test case), got {s!r}",
                                  fix="give each silo at least 2 cases")
    profiles = []
    for i in range(n_silos):
        total = int(sizes[i]) if sizes is not None else int(round(_spread(120, 240, n_silos, i)))
        n_test = min(20, max(1, total // 5))
        j = lambda k: (i + k) % n_silos  # noqa: E731 - rotate each knob by one silo
        profiles.append(
            SiloProfile(
                name=f"hospital{i}",
                n_train=total - n_test,
                n_test=n_test,
                intensity_scale=round(_spread(0.6, 2.0, n_silos, j(0)), 3),
                noise=round(_spread(0.1, 0.5, n_silos, j(1)), 3),
                num_objects=int(round(_spread(2, 6, n_silos, j(2)))),
                radius_max=int(round(_spread(6, 10, n_silos, j(3)))),
                seed=_profile_seed(seed, i),
                pixel_spacing=_PIXEL_SPACINGS[i % len(_PIXEL_SPACINGS)],
                slice_thickness=round(_spread(1.0, 2.0, n_silos, j(2)), 4),
                modality="CT",
                institution=f"{_INSTITUTIONS[i % len(_INSTITUTIONS)]} {i}",
            )
        )
    return profiles


# --------------------------------------------------------------------------------------------- checks


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}",
                          fix="pass task='seg3d', 'seg2d', 'cls3d' or 'cls2d'")
    return task


def _check_size(size: int | None, task: str) -> int:
    if size is None:
        return DEFAULT_SIZE[task]
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or not MIN_SIZE <= int(size) <= MAX_SIZE:
        raise ConfigError(f"size must be an integer from {MIN_SIZE} to {MAX_SIZE}, got {size!r}",
                          fix=f"pass size={DEFAULT_SIZE[task]} (or leave it unset for the task's default)")
    return int(size)


def _check_profile(p: SiloProfile) -> None:
    def bad(field: str, want: str) -> ConfigError:
        return ConfigError(f"profile {p.name!r}: {field} must be {want}, got {getattr(p, field)!r}",
                           fix=f"fix SiloProfile.{field}")

    if not p.name or not all(c.isalnum() or c in "-_." for c in p.name) or p.name.startswith("."):
        raise bad("name", "a plain folder name (letters, digits, - _ .)")
    if not isinstance(p.n_train, int) or p.n_train < 1:
        raise bad("n_train", "an integer >= 1")
    if not isinstance(p.n_test, int) or p.n_test < 0:
        raise bad("n_test", "an integer >= 0")
    if not (isinstance(p.intensity_scale, int | float) and 0 < p.intensity_scale <= 4.0):
        raise bad("intensity_scale", "a number in (0, 4]")
    if not (isinstance(p.noise, int | float) and 0 <= p.noise < 1):
        raise bad("noise", "a number in [0, 1)")
    if not isinstance(p.num_objects, int) or p.num_objects < 1:
        raise bad("num_objects", "an integer >= 1")
    if not isinstance(p.radius_max, int) or p.radius_max < 2:
        raise bad("radius_max", "an integer >= 2")
    if not (isinstance(p.pixel_spacing, int | float) and 0.05 <= p.pixel_spacing <= 20):
        raise bad("pixel_spacing", "a number of mm in [0.05, 20]")
    if not (isinstance(p.slice_thickness, int | float) and 0.05 <= p.slice_thickness <= 20):
        raise bad("slice_thickness", "a number of mm in [0.05, 20]")
    if p.modality not in MODALITIES:
        raise bad("modality", "'CT' or 'MR'")


# --------------------------------------------------------------------------------------------- geometry


def _ds(x: float) -> str:
    """A DS string (<= 16 chars) with at most 4 decimals; the geometry uses the parsed value."""
    s = f"{x:.4f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


@dataclass(frozen=True)
class _Geometry:
    size: int
    n_slices: int
    spacing: float
    thickness: float
    origin: tuple[float, float, float]  # LPS, mm, of the first voxel of the first slice

    def z(self, k: int) -> str:
        return _ds(self.origin[2] + k * self.thickness)


def _geometry(size: int, n_slices: int, spacing: float, thickness: float) -> _Geometry:
    half = (size - 1) * spacing / 2
    zhalf = (n_slices - 1) * thickness / 2
    origin = (float(_ds(-half)), float(_ds(-half)), float(_ds(-zhalf)))
    return _Geometry(size, n_slices, float(_ds(spacing)), float(_ds(thickness)), origin)


def _nifti_affine(geom: _Geometry) -> np.ndarray:
    """The RAS affine MONAI's PydicomReader (affine_lps_to_ras=True, swap_ij=True) reports for the series.

    Array axis 0 runs along the DICOM row direction (+x, column index), axis 1 along the column direction
    (+y, row index), axis 2 along the slices (+z). LPS -> RAS negates the first two rows. For one slice (2D)
    PydicomReader puts 1.0 on the slice axis, as here.
    """
    x0, y0, z0 = geom.origin
    if geom.n_slices > 1:
        zlast = float(geom.z(geom.n_slices - 1))
        dz = (zlast - z0) / (geom.n_slices - 1)
    else:
        dz = 1.0
    return np.array(
        [[-geom.spacing, 0.0, 0.0, -x0], [0.0, -geom.spacing, 0.0, -y0], [0.0, 0.0, dz, z0], [0.0, 0.0, 0.0, 1.0]]
    )


# --------------------------------------------------------------------------------------------- DICOM writing


_SOP_INSTANCE_UID, _INSTANCE_NUMBER, _IMAGE_POSITION, _SLICE_LOCATION, _PIXEL_DATA = (
    0x00080018, 0x00200013, 0x00200032, 0x00201041, 0x7FE00010)


def _even(value: bytes, pad: bytes) -> bytes:
    return value + pad if len(value) % 2 else value


def _short_element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element with a 2-byte length (UI, IS, DS), as pydicom encodes it."""
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


class _SeriesWriter:
    """Encodes one case's template dataset once; each slice's file is then assembled from pre-encoded chunks.

    Everything but SOPInstanceUID, InstanceNumber, ImagePositionPatient, SliceLocation and PixelData (and
    MediaStorageSOPInstanceUID in the file meta) is encoded once per case by pydicom's own element writer, in
    tag order, exactly as ``dcmwrite(..., enforce_file_format=True)`` would. The five per-slice elements are
    encoded with ``struct`` (UI padded with NUL, IS/DS with a space, OW with a 4-byte length); a test checks
    that every file is byte-identical to pydicom's ``save_as`` of the dataset read back.
    """

    VARYING = (_SOP_INSTANCE_UID, _INSTANCE_NUMBER, _IMAGE_POSITION, _SLICE_LOCATION, _PIXEL_DATA)

    def __init__(self, ds: Dataset) -> None:
        correct_ambiguous_vr(ds, True)
        encoding = ds.get("SpecificCharacterSet", "iso8859")
        self._chunks: list[bytes | int] = []
        fp = self._new_fp()
        for tag in sorted(ds.keys()):
            if int(tag) in self.VARYING:
                self._chunks.append(fp.getvalue())
                self._chunks.append(int(tag))
                fp = self._new_fp()
            else:
                write_data_element(fp, ds[tag], encoding)
        self._chunks.append(fp.getvalue())
        # The File Meta Information differs between slices only in MediaStorageSOPInstanceUID: encode it once
        # and splice each slice's UID in when it has the template's padded length (generate_uid(entropy_srcs)
        # UIDs always have 64 characters); otherwise encode it again.
        self._file_meta = ds.file_meta
        fp = self._new_fp()
        write_file_meta_info(fp, self._file_meta, enforce_standard=True)
        meta = fp.getvalue()
        uid = _even(str(self._file_meta.MediaStorageSOPInstanceUID).encode("ascii"), b"\x00")
        start = meta.index(uid)
        self._meta_uid_len = len(uid)
        self._meta_head, self._meta_tail = b"\x00" * 128 + b"DICM" + meta[:start], meta[start + len(uid):]

    @staticmethod
    def _new_fp() -> Any:
        fp = DicomBytesIO()
        fp.is_little_endian = True
        fp.is_implicit_VR = False
        return fp

    def encode(self, sop_uid: str, number: int, position: Sequence[str], z: str, pixels: bytes) -> bytes:
        """The complete DICOM file (preamble, file meta, dataset) for one slice."""
        uid = _even(sop_uid.encode("ascii"), b"\x00")
        if len(uid) == self._meta_uid_len:
            parts = [self._meta_head, uid, self._meta_tail]
        else:
            self._file_meta.MediaStorageSOPInstanceUID = sop_uid
            fp = self._new_fp()
            write_file_meta_info(fp, self._file_meta, enforce_standard=True)
            parts = [b"\x00" * 128 + b"DICM", fp.getvalue()]
        values = {
            _SOP_INSTANCE_UID: _short_element(_SOP_INSTANCE_UID, b"UI", uid),
            _INSTANCE_NUMBER: _short_element(_INSTANCE_NUMBER, b"IS", _even(str(number).encode("ascii"), b" ")),
            _IMAGE_POSITION: _short_element(_IMAGE_POSITION, b"DS", _even("\\".join(position).encode("ascii"), b" ")),
            _SLICE_LOCATION: _short_element(_SLICE_LOCATION, b"DS", _even(z.encode("ascii"), b" ")),
            _PIXEL_DATA: struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, len(pixels)) + pixels,
        }
        parts.extend(values[c] if isinstance(c, int) else c for c in self._chunks)
        return b"".join(parts)


def _write_file(path: Path, data: bytes) -> None:
    # os.open/os.write: three system calls per file instead of six through open() (17,000 files in the demo)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _uid(*parts: object) -> str:
    return str(generate_uid(prefix=_UID_PREFIX, entropy_srcs=["fedsilo-synth", *map(str, parts)]))


def _fake_phi(rs: np.random.RandomState, institution: str) -> dict[str, str]:
    first = _FIRST_NAMES[rs.randint(len(_FIRST_NAMES))]
    last = _LAST_NAMES[rs.randint(len(_LAST_NAMES))]
    doc_first = _FIRST_NAMES[rs.randint(len(_FIRST_NAMES))]
    doc_last = _LAST_NAMES[rs.randint(len(_LAST_NAMES))]
    birth = f"{rs.randint(1935, 2006)}{rs.randint(1, 13):02d}{rs.randint(1, 29):02d}"
    study = f"{rs.randint(2015, 2025)}{rs.randint(1, 13):02d}{rs.randint(1, 29):02d}"
    mrn = f"MRN{rs.randint(1_000_000, 10_000_000)}"
    return {
        "PatientName": f"{last}^{first}",
        "PatientID": mrn,
        "PatientBirthDate": birth,
        "AccessionNumber": f"ACC{rs.randint(10_000_000, 100_000_000)}",
        "StudyDate": study,
        "ReferringPhysicianName": f"{doc_last}^{doc_first}^^DR",
        "InstitutionName": institution,
        # free text, drawn from the values above (no further draws: the other values stay as they were)
        "ImageComments": f"Pt {first.title()} {last.title()} ({mrn}), compare with prior at {institution}",
    }


def _template(
    profile: SiloProfile, geom: _Geometry, phi: dict[str, str], key: tuple, index: int, rs: np.random.RandomState
) -> Dataset:
    """The case's dataset, with slice 0's values in the per-slice elements."""
    ct = profile.modality == "CT"
    sop_class = CTImageStorage if ct else MRImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = _uid(*key, "sop", 0)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationVersionName = "FEDSILO_SYNTH"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyDate = phi["StudyDate"]
    ds.SeriesDate = phi["StudyDate"]
    ds.ContentDate = phi["StudyDate"]
    ds.StudyTime = f"{rs.randint(7, 19):02d}{rs.randint(60):02d}{rs.randint(60):02d}"
    ds.AccessionNumber = phi["AccessionNumber"]
    ds.Modality = profile.modality
    ds.Manufacturer = "Fedsilo Synthetic"
    ds.InstitutionName = phi["InstitutionName"]
    ds.ReferringPhysicianName = phi["ReferringPhysicianName"]
    descriptions = _STUDY_DESCRIPTIONS[profile.modality]
    ds.StudyDescription = descriptions[index % len(descriptions)]
    ds.SeriesDescription = "SYNTHETIC AXIAL" if geom.n_slices > 1 else "SYNTHETIC SINGLE SLICE"
    ds.ManufacturerModelName = f"SYNTH-{profile.modality}-{profile.name}"
    ds.ImageComments = phi["ImageComments"]
    ds.PatientName = phi["PatientName"]
    ds.PatientID = phi["PatientID"]
    ds.PatientBirthDate = phi["PatientBirthDate"]
    ds.PatientSex = "F" if rs.randint(2) else "M"
    ds.SliceThickness = _ds(geom.thickness)
    if not ct:
        ds.MagneticFieldStrength = "1.5"
    ds.SpacingBetweenSlices = _ds(geom.thickness)
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = _uid(*key, "study")
    ds.SeriesInstanceUID = _uid(*key, "series")
    ds.StudyID = str(index + 1)
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [_ds(geom.origin[0]), _ds(geom.origin[1]), geom.z(0)]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = _uid(*key, "frame")
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = geom.z(0)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = geom.size
    ds.Columns = geom.size
    ds.PixelSpacing = [_ds(geom.spacing), _ds(geom.spacing)]
    ds.BitsAllocated = 16
    if ct:
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = str(_CT_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
    else:
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
    ds.PixelData = b"\x00\x00" * geom.size * geom.size
    ds["PixelData"].VR = "OW"
    return ds


def _stored(image: np.ndarray, profile: SiloProfile) -> np.ndarray:
    values = np.rint(image * profile.intensity_scale * _SCALE)
    if profile.modality == "CT":
        return np.clip(values, 0, 32767).astype("<i2")
    return np.clip(values, 0, _MR_MAX).astype("<u2")


# --------------------------------------------------------------------------------------------- writers


def _check_root(root: Path, overwrite: bool) -> bool:
    """True when ``root`` holds a previous synthetic silo to replace; ConfigError when it may not be used."""
    if not root.exists():
        return False
    if not root.is_dir():
        raise ConfigError(f"{root} exists and is not a folder", fix="choose another output folder")
    if not any(root.iterdir()):
        return False
    if not overwrite or not (root / "datalist.json").is_file():
        raise ConfigError(
            f"{root} is not empty",
            fix="choose an empty output folder (overwrite=True replaces only a previous synthetic silo)",
        )
    return True


def _prepare_root(root: Path, overwrite: bool) -> None:
    if _check_root(root, overwrite):
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)


def _radii(profile: SiloProfile, size: int) -> tuple[int, int]:
    rad_max = min(int(round(profile.radius_max * size / 32)), (size - 1) // 2)
    rad_max = max(rad_max, 2)
    return rad_max, max(1, rad_max // 2)


def _write_case(
    root: Path,
    profile: SiloProfile,
    task: str,
    geom: _Geometry,
    affine: np.ndarray,
    index: int,
    rad_max: int,
    rad_min: int,
    institution: str,
    planted: set[str],
    splits: dict[str, list[dict[str, Any]]],
) -> None:
    """Generate case ``index``, write its DICOM series and label, add its datalist entry and PHI."""
    from monai.data.synthetic import create_test_image_2d, create_test_image_3d

    three_d = task.endswith("3d")
    seg = task.startswith("seg")
    size = geom.size
    split, position = ("training", index) if index < profile.n_train else ("test", index - profile.n_train)
    case = f"case-{index:04d}"
    rs = np.random.RandomState([profile.seed & 0xFFFFFFFF, index, 1])
    positive = (position % 2 == 0) if not seg else True
    n_objs = profile.num_objects if positive else 0
    if three_d:
        image, mask = create_test_image_3d(size, size, size, num_objs=n_objs, rad_max=rad_max, rad_min=rad_min,
                                           noise_max=profile.noise, num_seg_classes=1, random_state=rs)
    else:
        image, mask = create_test_image_2d(size, size, num_objs=n_objs, rad_max=rad_max, rad_min=rad_min,
                                           noise_max=profile.noise, num_seg_classes=1, random_state=rs)
        image, mask = image[:, :, None], mask[:, :, None]
    if n_objs == 0:
        # MONAI rescales pure noise to [0, 1]; bring it back to the silo's noise amplitude so that the
        # classes differ by the presence of objects, not by background brightness.
        image = image * profile.noise
    stored = _stored(image, profile)

    phi_rs = np.random.RandomState([profile.seed & 0xFFFFFFFF, index, 2])
    phi = _fake_phi(phi_rs, institution)
    planted.update(phi.values())
    key = (profile.name, profile.seed, task, geom.size, index)  # UIDs: deterministic, unique per case
    writer = _SeriesWriter(_template(profile, geom, phi, key, index, phi_rs))
    case_dir = root / "images" / case
    case_dir.mkdir()
    x0, y0 = _ds(geom.origin[0]), _ds(geom.origin[1])
    for k in range(geom.n_slices):
        z = geom.z(k)
        # MONAI's loaded array is (column, row, slice) after swap_ij: pixel[row, col] = volume[col, row, k].
        pixels = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        data = writer.encode(_uid(*key, "sop", k), k + 1, (x0, y0, z), z, pixels)
        _write_file(case_dir / f"slice-{k:03d}.dcm", data)

    entry: dict[str, Any] = {"case": case, "image": f"images/{case}"}
    if seg:
        label = (mask > 0).astype(np.uint8)
        if not three_d:
            label = label[:, :, 0]
        img = nib.Nifti1Image(label, affine)
        img.header.set_xyzt_units("mm")
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        nib.save(img, root / "labels" / f"{case}.nii.gz")
        entry["label"] = f"labels/{case}.nii.gz"
    else:
        entry["label"] = int(positive)
    splits[split].append(entry)


def write_synthetic_silo(
    out_dir: Path,
    profile: SiloProfile,
    *,
    task: str = "seg3d",
    size: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
) -> SyntheticSilo:
    """Write one synthetic hospital to ``out_dir/<profile.name>/`` and return what was written.

    Args:
        out_dir: parent folder (created if missing).
        profile: the silo's data profile.
        task: "seg3d" (default), "seg2d", "cls3d" or "cls2d".
        size: image edge in voxels, 16..512; None means :data:`DEFAULT_SIZE` for the task (32 for 3D, 64 for 2D).
        progress: called as ``progress(done, total)`` after each case.
        overwrite: replace ``out_dir/<name>`` if it holds a previous synthetic silo (it must contain
            datalist.json); otherwise a non-empty target folder is a ConfigError.

    Raises:
        ConfigError: unknown task, bad size or profile, or a non-empty target folder.
    """
    task = _check_task(task)
    size = _check_size(size, task)
    _check_profile(profile)
    three_d = task.endswith("3d")
    seg = task.startswith("seg")
    root = Path(out_dir) / profile.name
    _prepare_root(root, overwrite)
    (root / "images").mkdir()
    if seg:
        (root / "labels").mkdir()

    geom = _geometry(size, size if three_d else 1, profile.pixel_spacing, profile.slice_thickness)
    affine = _nifti_affine(geom)
    rad_max, rad_min = _radii(profile, size)
    institution = profile.institution or f"{_INSTITUTIONS[0]} {profile.name}"
    total = profile.n_train + profile.n_test
    planted: set[str] = set()
    splits: dict[str, list[dict[str, Any]]] = {"training": [], "test": []}

    # Single-threaded on purpose: a writer thread pool was measured no faster here (creating ~17,000 small
    # files is kernel time that two threads only contend for).
    for index in range(total):
        _write_case(root, profile, task, geom, affine, index, rad_max, rad_min, institution, planted, splits)
        if progress is not None:
            progress(index + 1, total)

    datalist = {
        "name": profile.name,
        "description": "fedsilo synthetic silo (MONAI create_test_image_*)",
        "task": task,
        "modality": profile.modality,
        "tensorImageSize": "3D" if three_d else "2D",
        "numTraining": profile.n_train,
        "numTest": profile.n_test,
        "labels": {"0": "background", "1": "object"},
        "training": splits["training"],
        "test": splits["test"],
    }
    path = root / "datalist.json"
    tmp = root / "datalist.json.tmp"
    tmp.write_text(json.dumps(datalist, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return SyntheticSilo(
        name=profile.name,
        root=root,
        datalist=path,
        n_train=profile.n_train,
        n_test=profile.n_test,
        planted_phi=tuple(sorted(planted)),
        task=task,
        modality=profile.modality,
        size=size,
    )


def write_synthetic_federation(
    out_dir: Path,
    *,
    silos: int = 3,
    task: str = "seg3d",
    size: int | None = None,
    seed: int = 0,
    sizes: Sequence[int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
) -> list[SyntheticSilo]:
    """Write ``silos`` synthetic hospitals from :func:`default_profiles` to ``out_dir/<name>/``.

    ``progress(done, total)`` counts cases over all silos. See :func:`write_synthetic_silo` for the rest.
    """
    if isinstance(silos, bool) or not isinstance(silos, int) or silos < 1:
        raise ConfigError(f"silos must be an integer >= 1, got {silos!r}", fix="pass --silos 1 or more")
    task = _check_task(task)
    size = _check_size(size, task)
    profiles = default_profiles(silos, seed=seed, sizes=sizes)
    for profile in profiles:  # refuse before writing anything
        _check_root(Path(out_dir) / profile.name, overwrite)
    grand_total = sum(p.n_train + p.n_test for p in profiles)
    written: list[SyntheticSilo] = []
    offset = 0
    for profile in profiles:
        inner = None
        if progress is not None:
            base = offset

            def inner(done: int, _total: int, base: int = base) -> None:
                progress(base + done, grand_total)

        written.append(write_synthetic_silo(out_dir, profile, task=task, size=size, progress=inner,
                                            overwrite=overwrite))
        offset += profile.n_train + profile.n_test
    return written
