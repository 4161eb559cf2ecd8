"""The ingest scan on real DICOM and NIfTI files: series, geometry, bad input, labels, classes, and the
files pydicom and nibabel ship (none may crash the scan; each is in a case or rejected with a reason)."""

from __future__ import annotations

import importlib.resources
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from fedsilo.errors import ConfigError, DataError
from pipelines.dataset import CaseSource, case_content_hash, load_cases, load_split, stat_fingerprint
from pipelines.ingest import scan_datalist, scan_images
from pipelines.ingest.dicom import DicomHeader, _scan_with_pydicom, decoder_problem, fast_header, scan_file
from pipelines.ingest.series import monai_affine
from pipelines.synthetic import write_synthetic_federation

SIZE = 16


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """One synthetic seg3d silo: 3 cases of 16 slices (16^3) with NIfTI labels."""
    [silo] = write_synthetic_federation(tmp_path_factory.mktemp("syn"), silos=1, size=SIZE, sizes=[3])
    return silo


@pytest.fixture
def silo(synthetic, tmp_path):
    """A private copy of the synthetic silo, free to damage."""
    root = tmp_path / "silo"
    shutil.copytree(synthetic.root, root)
    return root


def _edit(path: Path, **values) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)


def _z(path: Path) -> float:
    return float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])


def _reasons(result, path: Path) -> list[str]:
    return [r.reason for r in result.rejections if Path(r.path) == path]


def _accounted_once(root: Path, result) -> None:
    """Every file under root/images and root/labels is in exactly one case or exactly one rejection."""
    named = [f for c in result.cases for f in c.image.files + (c.label.files if c.label else ())]
    named += [r.path for r in result.rejections if os.path.isfile(r.path)]
    files = sorted(str(p) for sub in ("images", "labels", "img", "lab") for p in (root / sub).rglob("*") if p.is_file())
    assert sorted(named) == files


def test_synthetic_silo_registers_every_case_with_its_geometry(silo):
    result = scan_images(silo / "images", task="seg3d", labels=silo / "labels")
    assert [c.key for c in result.cases] == ["case-0000", "case-0001", "case-0002"] and not result.rejections
    case = result.cases[0]
    assert case.image.shape == (SIZE,) * 3 and case.image.spacing == (1.0, 1.0, 1.0) and len(case.image.files) == SIZE
    assert np.allclose(case.image.affine, nib.load(case.label.files[0]).affine, atol=1e-4)
    _accounted_once(silo, result)


def test_datalist_keeps_its_split(silo):
    result = scan_datalist(silo / "datalist.json", task="seg3d")
    assert [c.split for c in result.cases] == ["training", "training", "test"] and not result.rejections


def test_two_series_in_one_folder_are_never_stacked(silo):
    folder = silo / "images" / "case-0000"
    for f in sorted((silo / "images" / "case-0001").iterdir()):
        shutil.copy(f, folder / f"other-{f.name}")
    shutil.rmtree(silo / "images" / "case-0001")
    result = scan_images(silo / "images", task="seg3d", labels=silo / "labels")
    # Both series share one folder: each is found with its own 16 slices, neither gets a label by guesswork.
    shared = [r for r in result.rejections if "images match the label 'case-0000'" in r.reason]
    assert len(shared) == 2 * SIZE and {len([r for r in shared if "other-" in r.path]), len([r for r in shared if "other-" not in r.path])} == {SIZE}
    assert [c.key for c in result.cases] == ["case-0002"]
    assert any(r.reason == "label with no matching image" for r in result.rejections)


def test_slices_are_ordered_along_the_normal_not_by_name(silo):
    folder = silo / "images" / "case-0000"
    files = sorted(folder.iterdir())
    for i, f in enumerate(files):  # names now run against the positions
        f.rename(folder / f"x-{len(files) - i:03d}.dcm")
    result = scan_images(silo / "images", task="seg3d", labels=silo / "labels")
    case = next(c for c in result.cases if c.key == "case-0000")
    z = [_z(Path(f)) for f in case.image.files]
    assert z == sorted(z) and len(z) == SIZE


def test_sagittal_series_is_ordered_by_x(tmp_path, synthetic):
    folder = tmp_path / "sag"
    shutil.copytree(synthetic.root / "images" / "case-0000", folder)
    files = sorted(folder.iterdir())
    order = np.random.RandomState(0).permutation(len(files))
    for k, f in zip(order, files):  # sagittal: rows along y, columns along z, slices along x
        _edit(f, ImageOrientationPatient=[0, 1, 0, 0, 0, -1], ImagePositionPatient=[float(k) * 2.0, -7.5, 7.5])
    result = scan_images(folder, task="cls3d", labels=_csv(tmp_path, "image,label\n.,1\n"))
    [case] = result.cases
    x = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[0]) for f in case.image.files]
    # the slice normal (row x column direction) points to -x here: the slices run along it, from +x to -x
    assert x == sorted(x, reverse=True) and case.image.spacing[2] == pytest.approx(2.0) and case.label_class == 1
    assert np.allclose(np.asarray(case.image.affine)[:3, 2], [2.0, 0.0, 0.0])  # LPS -x is RAS +x


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("defect", "kind", "needle"),
    [
        ("missing slice", "geometry", "1 slice(s) missing"),
        ("duplicate position", "geometry", "share a position"),
        ("orientation", "geometry", "differ in ImageOrientationPatient"),
        ("size", "geometry", "differ in size"),
        ("uneven", "geometry", "uneven slice spacing"),
    ],
)
def test_a_series_with_bad_geometry_is_rejected_whole(silo, defect, kind, needle):
    folder = silo / "images" / "case-0001"
    files = sorted(folder.iterdir())
    if defect == "missing slice":
        files.pop(7).unlink()
    elif defect == "duplicate position":
        shutil.copy(files[3], folder / "copy.dcm")
        _edit(folder / "copy.dcm", SOPInstanceUID=pydicom.uid.generate_uid())
        files.append(folder / "copy.dcm")
    elif defect == "orientation":
        _edit(files[5], ImageOrientationPatient=[1, 0, 0, 0, 0.9, 0.1])
    elif defect == "size":
        _edit(files[5], Rows=8, Columns=32)
    elif defect == "uneven":
        _edit(files[-1], ImagePositionPatient=[-7.5, -7.5, _z(files[-1]) + 0.3])
    result = scan_images(silo / "images", task="seg3d", labels=silo / "labels")
    assert [c.key for c in result.cases] == ["case-0000", "case-0002"]
    for f in files:
        assert [r for r in result.rejections if Path(r.path) == f and r.kind == kind and needle in r.reason], f
    _accounted_once(silo, result)


def test_a_duplicate_file_is_rejected_and_the_series_kept(silo):
    folder = silo / "images" / "case-0001"
    shutil.copy(folder / "slice-003.dcm", folder / "slice-003b.dcm")
    result = scan_images(silo / "images", task="seg3d", labels=silo / "labels")
    assert len(result.cases) == 3 and len(next(c for c in result.cases if c.key == "case-0001").image.files) == SIZE
    assert _reasons(result, folder / "slice-003b.dcm") == [f"duplicate of {folder / 'slice-003.dcm'} (same SOPInstanceUID)"]


def test_bad_files_each_get_one_reason_and_nothing_crashes(silo):
    images = silo / "images"
    (images / "notes.txt").write_text("not an image")
    (images / "empty").mkdir()
    data = (images / "case-0002" / "slice-005.dcm").read_bytes()
    (images / "case-0002" / "slice-005.dcm").write_bytes(data[: len(data) - 100])  # truncated pixel data
    (images / "garbage.dcm").write_bytes(b"\0" * 128 + b"DICM" + os.urandom(300))
    shutil.copy(get_testdata_file("test-SR.dcm", download=False), images / "report.dcm")
    shutil.copy(get_testdata_file("MR_small_jpeg_ls_lossless.dcm", download=False), images / "jpegls.dcm")
    result = scan_images(images, task="seg3d", labels=silo / "labels")
    assert _reasons(result, images / "notes.txt") == ["not a DICOM file (no DICM preamble) and not NIfTI"]
    assert _reasons(result, images / "empty") == ["empty folder"]
    [truncated] = _reasons(result, images / "case-0002" / "slice-005.dcm")
    assert truncated.startswith("PixelData holds") and "need" in truncated
    [garbage] = [r for r in result.rejections if Path(r.path) == images / "garbage.dcm"]
    assert garbage.kind in ("corrupt", "no-pixels")  # random bytes after the preamble: no image in any case
    assert _reasons(result, images / "report.dcm") == ["structured report (SR), not an image"]
    [jpegls] = _reasons(result, images / "jpegls.dcm")
    assert "JPEG-LS" in jpegls and "pylibjpeg-libjpeg" in jpegls  # names the package to install
    # case-0002 lost a slice to corruption: the rest of its series has a gap, so it is rejected too
    assert "1 slice(s) missing" in _reasons(result, images / "case-0002" / "slice-006.dcm")[0]
    assert [c.key for c in result.cases] == ["case-0000", "case-0001"]
    assert any("label with no matching image" == r for r in _reasons(result, silo / "labels" / "case-0002.nii.gz"))
    _accounted_once(silo, result)


def test_a_dicomdir_given_as_the_source_is_followed(tmp_path):
    index = Path(get_testdata_file("DICOMDIR", download=False))
    result = scan_images(index, task="seg3d", labels=tmp_path)
    referenced = {str(p) for p in index.parent.rglob("*") if p.is_file() and p.parent != index.parent}
    named = {f for c in result.cases for f in c.image.files} | {r.path for r in result.rejections}
    assert result.files_seen == 32 and len(named & referenced) == 31  # the index and the 31 files it lists
    assert any(r.kind == "index" and "31 file(s)" in r.reason for r in result.rejections)


def test_decoder_problem_names_what_to_install():
    assert decoder_problem(pydicom.uid.ExplicitVRLittleEndian) is None
    assert decoder_problem(pydicom.uid.RLELossless) is None  # pydicom decodes RLE itself
    assert "pylibjpeg-openjpeg" in decoder_problem(pydicom.uid.JPEG2000Lossless)


def test_labels_must_match_shape_and_affine(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "lab").mkdir()
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    for name in ("ok", "shape", "affine", "nolabel"):
        nib.save(nib.Nifti1Image(np.zeros((6, 6, 4), np.float32), affine), tmp_path / "img" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 4), np.uint8), affine), tmp_path / "lab" / "ok.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 5), np.uint8), affine), tmp_path / "lab" / "shape.nii.gz")
    moved = affine.copy()
    moved[0, 3] = 0.5
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 4), np.uint8), moved), tmp_path / "lab" / "affine.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 4), np.uint8), affine), tmp_path / "lab" / "orphan.nii.gz")
    result = scan_images(tmp_path / "img", task="seg3d", labels=tmp_path / "lab")
    assert [c.key for c in result.cases] == ["ok"]
    assert "label shape 6x6x5 does not match image shape 6x6x4" in _reasons(result, tmp_path / "img" / "shape.nii.gz")[0]
    assert "affine) differs from its image by up to 0.5 mm" in _reasons(result, tmp_path / "lab" / "affine.nii.gz")[0]
    assert _reasons(result, tmp_path / "img" / "nolabel.nii.gz")[0].startswith("no label found for this image")
    assert _reasons(result, tmp_path / "lab" / "orphan.nii.gz") == ["label with no matching image"]
    _accounted_once(tmp_path, result)


def test_truncated_nifti_is_corrupt(tmp_path):
    (tmp_path / "img").mkdir()
    nib.save(nib.Nifti1Image(np.random.rand(8, 8, 8).astype(np.float32), np.eye(4)), tmp_path / "img" / "a.nii.gz")
    data = (tmp_path / "img" / "a.nii.gz").read_bytes()
    (tmp_path / "img" / "a.nii.gz").write_bytes(data[: len(data) // 2])
    nib.save(nib.Nifti1Image(np.random.rand(8, 8, 8).astype(np.float32), np.eye(4)), tmp_path / "img" / "b.nii")
    (tmp_path / "img" / "b.nii").write_bytes((tmp_path / "img" / "b.nii").read_bytes()[:-50])
    result = scan_images(tmp_path / "img", task="cls3d", labels=_csv(tmp_path, "image,label\na,0\nb,1\n"))
    assert not result.cases
    assert "gzip stream is damaged or truncated" in _reasons(result, tmp_path / "img" / "a.nii.gz")[0]
    assert "truncated NIfTI" in _reasons(result, tmp_path / "img" / "b.nii")[0]


def test_classes_from_csv_by_number_or_name(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a", "b", "c", "d"):
        nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), tmp_path / "img" / f"{name}.nii")
    csv_path = _csv(tmp_path, "image,label\na.nii,tumour\nb,normal\nc,maybe\nzzz,normal\n")
    result = scan_images(tmp_path / "img", task="cls2d", labels=csv_path, classes=("normal", "tumour"))
    assert {c.key: c.label_class for c in result.cases} == {"a": 1, "b": 0}
    assert _reasons(result, tmp_path / "img" / "d.nii")[0].startswith("no class for this image")
    assert any("row 4: the label is not a class number or class name" in n for n in result.notes)
    assert any("1 row(s) name no image" in n for n in result.notes)
    with pytest.raises(ConfigError, match="needs --labels"):
        scan_images(tmp_path / "img", task="cls2d")
    with pytest.raises(DataError, match="'image' .* column"):
        scan_images(tmp_path / "img", task="cls2d", labels=_csv(tmp_path, "path,y\na,1\n"))


def test_fast_header_agrees_with_pydicom(synthetic):
    path = synthetic.root / "images" / "case-0000" / "slice-004.dcm"
    data = path.read_bytes()
    ts, _, values, stop = fast_header(data)
    assert ts == pydicom.uid.ExplicitVRLittleEndian and data[stop:stop + 4] == b"\xe0\x7f\x10\x00"
    fast, slow = scan_file(str(path)), _scan_with_pydicom(str(path), os.stat(path), data)
    assert isinstance(fast, DicomHeader) and fast == slow
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert fast.position == tuple(float(v) for v in ds.ImagePositionPatient) and fast.rows == ds.Rows


def test_monai_affine_matches_the_synthetic_label_convention(synthetic):
    result = scan_images(synthetic.root / "images", task="seg3d", labels=synthetic.root / "labels")
    for case in result.cases:
        assert np.allclose(case.image.affine, nib.load(case.label.files[0]).affine, atol=1e-4)
    a = monai_affine([1, 0, 0, 0, 1, 0], [10.0, 20.0, 30.0], [0.5, 2.0], [10.0, 20.0, 40.0], 11)
    assert np.allclose(a, [[-2, 0, 0, -10], [0, -0.5, 0, -20], [0, 0, 1, 30], [0, 0, 0, 1]])


def test_registered_cases_load_through_monai_and_the_cache(synthetic, tmp_path, monkeypatch):
    result = scan_images(synthetic.root / "images", task="seg3d", labels=synthetic.root / "labels")
    cases = [CaseSource(content_sha256=case_content_hash(c.image.sha256, c.label.sha256[0]), image_format="dicom",
                        image_files=c.image.files, label_file=c.label.files[0],
                        stat_sha256=stat_fingerprint(c.image.files + c.label.files, list(c.image.stats + c.label.stats)))
             for c in result.cases]
    first = load_cases(cases, task="seg3d", cache_dir=tmp_path / "cache")
    # The same pixels as MONAI's own reader on the series folder (the datalist path).
    train, test = (load_split(synthetic.datalist, s, task="seg3d") for s in ("training", "test"))
    np.testing.assert_array_equal(first.images, np.concatenate([train.images, test.images]))
    np.testing.assert_array_equal(first.labels, np.concatenate([train.labels, test.labels]))
    entries = sorted((tmp_path / "cache").rglob("*.npz"))
    assert len(entries) == 3
    with np.load(entries[0], allow_pickle=False) as z:
        assert set(z.files) == {"image", "affine", "label"}  # pixels and geometry only
    import pipelines.dataset as dataset

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cached case was decoded again")

    monkeypatch.setattr(dataset, "load_registered", no_decoding)
    again = load_cases(cases, task="seg3d", cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.images, first.images)


def test_a_changed_source_is_refused_before_use(synthetic, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(synthetic.root, root)
    result = scan_images(root / "images", task="seg3d", labels=root / "labels")
    c = result.cases[0]
    case = CaseSource(content_sha256=case_content_hash(c.image.sha256, c.label.sha256[0]), image_format="dicom",
                      image_files=c.image.files, label_file=c.label.files[0],
                      stat_sha256=stat_fingerprint(c.image.files + c.label.files, list(c.image.stats + c.label.stats)))
    with open(c.image.files[3], "ab") as fh:
        fh.write(b"\0\0")
    with pytest.raises(DataError, match="changed since registration.*dataset check"):
        load_cases([case], task="seg3d", cache_dir=tmp_path / "cache")
    os.unlink(c.image.files[3])
    with pytest.raises(DataError, match="registered source file is missing"):
        load_cases([case], task="seg3d", cache_dir=tmp_path / "cache")


# ------------------------------------------------------------------------------------------------ packaged test data


def _pydicom_test_files() -> Path:
    return Path(pydicom.__file__).parent / "data" / "test_files"


def _nibabel_test_files() -> Path:
    return Path(str(importlib.resources.files("nibabel") / "tests" / "data"))


@pytest.mark.parametrize("task", ["seg3d", "seg2d", "cls3d"])
@pytest.mark.parametrize("which", ["pydicom", "nibabel"])
def test_every_packaged_test_file_is_accounted_for(tmp_path, which, task):
    root = _pydicom_test_files() if which == "pydicom" else _nibabel_test_files()
    if task.startswith("seg"):
        (tmp_path / "labels").mkdir()
        result = scan_images(root, task=task, labels=tmp_path / "labels")
    else:
        result = scan_images(root, task=task, labels=_csv(tmp_path, "image,label\nnone,0\n"))
    named = [f for c in result.cases for f in c.image.files] + [r.path for r in result.rejections]
    files = sorted(str(p) for p in root.rglob("*") if p.is_file())
    assert sorted(p for p in named if os.path.isfile(p)) == files  # each file once: in a case or rejected
    assert all(r.reason and r.kind for r in result.rejections)
    if which == "pydicom":
        kinds = {r.kind for r in result.rejections}
        assert {"non-image", "decoder", "not-image-file", "index", "no-pixels"} <= kinds
