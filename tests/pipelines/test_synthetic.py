"""pipelines.synthetic: real DICOM series + NIfTI labels that MONAI reads aligned."""

from __future__ import annotations

import dataclasses
import io
import json
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from fedsilo.errors import ConfigError
from pipelines.synthetic import (
    DEFAULT_SIZE,
    SiloProfile,
    SyntheticSilo,
    default_profiles,
    write_synthetic_federation,
    write_synthetic_silo,
)

SIZE3D = 16
SIZE2D = 24


def _profile(**changes) -> SiloProfile:
    base = SiloProfile(name="h", n_train=3, n_test=1, intensity_scale=1.5, noise=0.2, num_objects=3,
                       radius_max=8, seed=11, pixel_spacing=1.25, slice_thickness=2.0)
    return dataclasses.replace(base, **changes)


def _load(image: Path, label: Path, axcodes: str) -> dict:
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

    chain = Compose([
        LoadImaged(keys="image", reader="PydicomReader"),
        LoadImaged(keys="label", reader="NibabelReader"),
        EnsureChannelFirstd(keys=["image", "label"]),
        Orientationd(keys=["image", "label"], axcodes=axcodes),
    ])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return chain({"image": str(image), "label": str(label)})


@pytest.fixture(scope="module")
def federation(tmp_path_factory) -> list[SyntheticSilo]:
    out = tmp_path_factory.mktemp("fed")
    calls: list[tuple[int, int]] = []
    silos = write_synthetic_federation(out, silos=2, size=SIZE3D, sizes=[6, 8],
                                       progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 14) for i in range(1, 15)]
    return silos


@pytest.fixture(scope="module")
def seg2d(tmp_path_factory) -> SyntheticSilo:
    return write_synthetic_silo(tmp_path_factory.mktemp("s2"), _profile(), task="seg2d", size=SIZE2D)


def _datalist(silo: SyntheticSilo) -> dict:
    return json.loads(silo.datalist.read_text(encoding="utf-8"))


def _entries(silo: SyntheticSilo) -> list[dict]:
    d = _datalist(silo)
    return d["training"] + d["test"]


# ------------------------------------------------------------------------------------------- layout


def test_federation_layout_and_datalist(federation):
    assert [s.name for s in federation] == ["hospital0", "hospital1"]
    assert [(s.n_train, s.n_test) for s in federation] == [(5, 1), (7, 1)]
    for silo in federation:
        assert silo.root.name == silo.name and silo.datalist == silo.root / "datalist.json"
        d = _datalist(silo)
        assert d["name"] == silo.name and d["task"] == "seg3d" and d["modality"] == "CT"
        assert len(d["training"]) == silo.n_train and len(d["test"]) == silo.n_test
        cases = [e["case"] for e in _entries(silo)]
        assert cases == [f"case-{i:04d}" for i in range(len(cases))]
        for e in _entries(silo):
            assert e["image"] == f"images/{e['case']}" and e["label"] == f"labels/{e['case']}.nii.gz"
            files = sorted((silo.root / e["image"]).iterdir())
            assert [f.name for f in files] == [f"slice-{k:03d}.dcm" for k in range(SIZE3D)]
            assert (silo.root / e["label"]).is_file()


def test_dicom_series_headers(federation):
    silo = federation[1]
    study_uids = set()
    for e in _entries(silo):
        slices = [pydicom.dcmread(f) for f in sorted((silo.root / e["image"]).iterdir())]
        assert {str(s.SeriesInstanceUID) for s in slices} == {str(slices[0].SeriesInstanceUID)}
        assert len({str(s.SOPInstanceUID) for s in slices}) == SIZE3D
        study_uids.add(str(slices[0].StudyInstanceUID))
        for k, s in enumerate(slices):
            assert s.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert s.file_meta.MediaStorageSOPInstanceUID == s.SOPInstanceUID
            assert s.SOPClassUID == pydicom.uid.CTImageStorage and s.Modality == "CT"
            assert s.InstanceNumber == k + 1
            assert [float(v) for v in s.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert (s.Rows, s.Columns, s.BitsAllocated, s.PhotometricInterpretation) == (
                SIZE3D, SIZE3D, 16, "MONOCHROME2")
            assert s.pixel_array.shape == (SIZE3D, SIZE3D)
            for uid in (s.SOPInstanceUID, s.SeriesInstanceUID, s.StudyInstanceUID, s.FrameOfReferenceUID):
                assert uid.is_valid
        z = np.array([float(s.ImagePositionPatient[2]) for s in slices])
        steps = np.diff(z)
        assert np.all(steps > 0)
        assert np.allclose(steps, float(slices[0].SliceThickness))
        assert np.allclose(steps, float(slices[0].SpacingBetweenSlices))
        assert len({str(s.FrameOfReferenceUID) for s in slices}) == 1
    assert len(study_uids) == silo.n_train + silo.n_test


def test_fast_writer_matches_pydicom_save_as(federation, seg2d, tmp_path):
    """Every file is byte-identical to what pydicom writes for the dataset it reads back."""
    mr = write_synthetic_silo(tmp_path, _profile(modality="MR", n_train=1, n_test=0), size=SIZE3D)
    files = sorted((federation[0].root / "images" / "case-0002").iterdir())
    files += sorted((seg2d.root / "images" / "case-0001").iterdir()) + sorted((mr.root / "images").rglob("*.dcm"))
    for f in files:
        raw = f.read_bytes()
        buf = io.BytesIO()
        pydicom.dcmread(f).save_as(buf, enforce_file_format=True)
        assert buf.getvalue() == raw


# ------------------------------------------------------------------------------------------- alignment


def test_monai_reads_seg3d_aligned(federation):
    silo = federation[0]
    for e in _entries(silo)[:2]:
        d = _load(silo.root / e["image"], silo.root / e["label"], "RAS")
        image, label = d["image"], d["label"]
        assert image.shape == label.shape == (1, SIZE3D, SIZE3D, SIZE3D)
        assert np.allclose(np.asarray(image.affine), np.asarray(label.affine), atol=1e-4)
        mask = np.asarray(label[0]) > 0
        assert set(np.unique(np.asarray(label))) <= {0.0, 1.0} and mask.any()
        img = np.asarray(image[0])
        assert img[mask].mean() > img[~mask].mean() + 100  # HU: objects vs background noise


@pytest.mark.parametrize("task,size,axcodes", [("seg3d", SIZE3D, "RAS"), ("seg2d", SIZE2D, "RA")])
def test_monai_alignment_is_exact_without_noise(tmp_path, task, size, axcodes):
    """With noise 0 the background is exactly -1024 HU, so the label must equal (image > -1024) voxel for voxel."""
    silo = write_synthetic_silo(tmp_path, _profile(noise=0.0, n_train=2, n_test=0), task=task, size=size)
    for e in _entries(silo):
        d = _load(silo.root / e["image"], silo.root / e["label"], axcodes)
        image, label = np.asarray(d["image"]), np.asarray(d["label"])
        assert image.shape == label.shape == (1,) + (size,) * (3 if task == "seg3d" else 2)
        assert np.allclose(np.asarray(d["image"].affine), np.asarray(d["label"].affine), atol=1e-4)
        assert label.any()
        np.testing.assert_array_equal(image > -1024, label > 0)
        # the NIfTI on disk is uint8 0/1
        nii = nib.load(silo.root / e["label"])
        assert nii.get_data_dtype() == np.uint8 and set(np.unique(np.asanyarray(nii.dataobj))) <= {0, 1}


def test_monai_reads_seg2d(seg2d):
    d = _datalist(seg2d)
    assert d["task"] == "seg2d"
    e = d["training"][0]
    assert len(list((seg2d.root / e["image"]).iterdir())) == 1
    out = _load(seg2d.root / e["image"], seg2d.root / e["label"], "RA")
    image, label = out["image"], out["label"]
    assert image.shape == label.shape == (1, SIZE2D, SIZE2D)
    assert np.allclose(np.asarray(image.affine), np.asarray(label.affine), atol=1e-4)
    mask = np.asarray(label[0]) > 0
    assert np.asarray(image[0])[mask].mean() > np.asarray(image[0])[~mask].mean() + 300


# ------------------------------------------------------------------------------------------- classification


@pytest.mark.parametrize("task", ["cls3d", "cls2d"])
def test_classification_labels(tmp_path, task):
    size = SIZE3D if task == "cls3d" else SIZE2D
    silo = write_synthetic_silo(tmp_path, _profile(n_train=4, n_test=2), task=task, size=size)
    d = _datalist(silo)
    assert d["task"] == task and not (silo.root / "labels").exists()
    for split in ("training", "test"):
        labels = [e["label"] for e in d[split]]
        assert all(type(v) is int for v in labels) and set(labels) == {0, 1}
    peaks = {0: [], 1: []}
    for e in _entries(silo):
        files = sorted((silo.root / e["image"]).iterdir())
        assert len(files) == (size if task == "cls3d" else 1)
        hu = np.stack([pydicom.dcmread(f).pixel_array.astype(float) for f in files])
        # positives hold objects (>= 0.5 * scale * 1000 stored); negatives stay below the noise amplitude
        peaks[e["label"]].append(hu.max())
    assert max(peaks[0]) < 0.2 * 1.5 * 1000 + 1 < min(peaks[1])


# ------------------------------------------------------------------------------------------- determinism, non-IID


def _pixels(silo: SyntheticSilo, case: str) -> np.ndarray:
    return np.stack([pydicom.dcmread(f).pixel_array for f in sorted((silo.root / "images" / case).iterdir())])


def test_same_seed_same_data(tmp_path, federation):
    again = write_synthetic_federation(tmp_path, silos=2, size=SIZE3D, sizes=[6, 8])
    for a, b in zip(federation, again, strict=True):
        assert a.planted_phi == b.planted_phi
        assert a.datalist.read_bytes() == b.datalist.read_bytes()
        for case in ("case-0000", "case-0005"):
            np.testing.assert_array_equal(_pixels(a, case), _pixels(b, case))
            assert (a.root / "labels" / f"{case}.nii.gz").read_bytes() == \
                (b.root / "labels" / f"{case}.nii.gz").read_bytes()
    other = write_synthetic_silo(tmp_path / "other", default_profiles(2, seed=1, sizes=[6, 8])[0], size=SIZE3D)
    assert not np.array_equal(_pixels(other, "case-0000"), _pixels(federation[0], "case-0000"))


def test_silos_differ(federation):
    a, b = federation
    pa, pb = (np.concatenate([_pixels(s, f"case-{i:04d}").ravel() for i in range(3)]) for s in (a, b))
    assert abs(pa.mean() - pb.mean()) > 0.1 * max(pa.mean(), pb.mean())
    spacing = {tuple(float(v) for v in pydicom.dcmread(s.root / "images/case-0000/slice-000.dcm").PixelSpacing)
               for s in federation}
    assert len(spacing) == 2


def test_default_profiles_are_non_iid():
    profiles = default_profiles(3)
    assert [p.name for p in profiles] == ["hospital0", "hospital1", "hospital2"]
    assert [p.n_train + p.n_test for p in profiles] == [120, 180, 240]
    assert all(p.n_test == 20 for p in profiles)
    for field in ("intensity_scale", "noise", "num_objects", "radius_max", "pixel_spacing", "seed"):
        assert len({getattr(p, field) for p in profiles}) == 3, field
    assert all(0.6 <= p.intensity_scale <= 2.0 and 0.1 <= p.noise <= 0.5 and 2 <= p.num_objects <= 6
               for p in profiles)
    assert default_profiles(3) == profiles and default_profiles(3, seed=5) != profiles
    assert [p.n_train + p.n_test for p in default_profiles(2, sizes=[6, 8])] == [6, 8]
    assert len(default_profiles(1)) == 1 and 100 <= default_profiles(5)[-1].n_train + 20 <= 300
    assert DEFAULT_SIZE == {"seg3d": 32, "cls3d": 32, "seg2d": 64, "cls2d": 64}


# ------------------------------------------------------------------------------------------- PHI


def test_planted_phi_in_headers_not_in_datalist(federation, seg2d):
    for silo in (*federation, seg2d):
        assert silo.planted_phi and len(set(silo.planted_phi)) == len(silo.planted_phi)
        header_values: set[str] = set()
        for e in _entries(silo):
            ds = pydicom.dcmread(next((silo.root / e["image"]).iterdir()), stop_before_pixels=True)
            for kw in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyDate",
                       "ReferringPhysicianName", "InstitutionName", "ImageComments"):
                header_values.add(str(ds.data_element(kw).value))
            assert str(ds.PatientID).startswith("MRN") and str(ds.AccessionNumber).startswith("ACC")
            assert "^" in str(ds.PatientName)
        assert header_values == set(silo.planted_phi)
        text = silo.datalist.read_text(encoding="utf-8")
        for value in silo.planted_phi:
            assert value not in text
        assert not any(value in str(p) for value in silo.planted_phi for p in silo.root.rglob("*"))
    institutions = {v for s in federation for v in s.planted_phi if ("Hospital" in v or "Center" in v) and not v.startswith("Pt ")}
    assert len(institutions) == 2


def test_mr_profile(tmp_path):
    silo = write_synthetic_silo(tmp_path, _profile(modality="MR", n_train=1, n_test=0), size=SIZE3D)
    assert _datalist(silo)["modality"] == "MR" and silo.modality == "MR"
    ds = pydicom.dcmread(silo.root / "images/case-0000/slice-005.dcm")
    assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.BitsStored == 12 and ds.PixelRepresentation == 0
    assert "RescaleIntercept" not in ds and ds.pixel_array.max() <= 4095


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,word",
    [({"silos": 0}, "silos"), ({"silos": "3"}, "silos"), ({"task": "seg4d"}, "task"), ({"size": 8}, "size"),
     ({"size": 15}, "size"), ({"sizes": [5]}, "sizes"), ({"silos": 2, "sizes": [1, 5]}, "sizes"),
     ({"seed": -1}, "seed")],
)
def test_bad_arguments(tmp_path, kwargs, word):
    with pytest.raises(ConfigError) as info:
        write_synthetic_federation(tmp_path, **kwargs)
    assert word in str(info.value) and info.value.fix
    assert not any(tmp_path.iterdir())


def test_bad_profile_and_occupied_folder(tmp_path):
    with pytest.raises(ConfigError, match="noise"):
        write_synthetic_silo(tmp_path, _profile(noise=1.5), size=SIZE3D)
    with pytest.raises(ConfigError, match="name"):
        write_synthetic_silo(tmp_path, _profile(name="../x"), size=SIZE3D)
    with pytest.raises(ConfigError, match="task"):
        write_synthetic_silo(tmp_path, _profile(), task="det3d")
    with pytest.raises(ConfigError, match="silos"):
        default_profiles(0)
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not empty"):
        write_synthetic_silo(tmp_path, _profile(n_train=1, n_test=0), size=SIZE3D)
    with pytest.raises(ConfigError, match="not empty"):  # overwrite only replaces a previous synthetic silo
        write_synthetic_silo(tmp_path, _profile(n_train=1, n_test=0), size=SIZE3D, overwrite=True)
    assert (tmp_path / "h" / "notes.txt").read_text() == "keep me"
    silo = write_synthetic_silo(tmp_path / "ok", _profile(n_train=1, n_test=0), size=SIZE3D)
    again = write_synthetic_silo(tmp_path / "ok", _profile(n_train=2, n_test=0), size=SIZE3D, overwrite=True)
    assert again.root == silo.root and len(_entries(again)) == 2


def test_federation_refuses_before_writing(tmp_path):
    (tmp_path / "hospital1").mkdir()
    (tmp_path / "hospital1" / "x").write_text("x")
    with pytest.raises(ConfigError, match="hospital1"):
        write_synthetic_federation(tmp_path, silos=2, size=SIZE3D, sizes=[2, 2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hospital1"]
