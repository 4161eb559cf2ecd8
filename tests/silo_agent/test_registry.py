"""``fedsilo silo dataset add|list|show|check|remove`` and the registry behind them, on real DICOM and NIfTI files."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from compliance import AuditLog, verify_log
from fedsilo.cli import main
from pipelines.synthetic import write_synthetic_federation
from silo_agent.registry import keyed_hash, load_registry, site_secret
from silo_agent.site import Site, init_site


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """One synthetic seg3d silo (5 cases of 16^3, planted PHI in every header)."""
    [silo] = write_synthetic_federation(tmp_path_factory.mktemp("syn"), silos=1, size=16, sizes=[5])
    return silo


@pytest.fixture
def data(synthetic, tmp_path) -> Path:
    root = tmp_path / "pacs-export"
    shutil.copytree(synthetic.root, root)
    return root


@pytest.fixture
def site(tmp_path) -> Path:
    init_site(tmp_path / "site", "hospital0")
    return tmp_path / "site"


def add(capsys, site: Path, data: Path, name: str = "ct", *extra) -> dict:
    code, out, err = cli(capsys, "silo", "dataset", "add", name, "--site", site, "--images", data / "images",
                         "--labels", data / "labels", "--task", "seg3d", "--json", *extra)
    assert (code, err) == (0, ""), err
    return json.loads(out)


def events(site: Path, event: str) -> list[dict]:
    with AuditLog.open(site / "audit", create=False) as log:
        return [r for r in log.records() if r["event"] == event]


def test_register_images_and_labels(capsys, site, data, synthetic):
    report = add(capsys, site, data)
    assert (report["cases"], report["training"] + report["test"], report["files_rejected"]) == (5, 5, 0)
    assert report["shapes"] == ["16x16x16"] and report["training"] >= 1 and report["test"] >= 1
    registry = load_registry(site / "datasets" / "ct" / "registry.json")
    assert registry.manifest_sha256 == report["manifest_sha256"]
    case = registry.cases[0]
    assert len(case.case_id) == 32 and len(case.series_hmac) == 64 and len(case.image_files) == 16
    assert all(Path(f).is_relative_to(data) for f in case.files)  # hospital paths stay inside the registry
    # No header value: none of the planted PHI, and no UID (only keyed hashes of them).
    text = (site / "datasets" / "ct" / "registry.json").read_text()
    assert not [v for v in synthetic.planted_phi if v in text]
    assert "1.2.826.0.1.3680043" not in text
    # The secret is private, and the ids are its HMACs.
    secret_file = site / "keys" / "registry.secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert case.case_id == keyed_hash(site_secret(site), "case", f"dicom-series:{_series_uid(case.image_files[0])}")[:32]
    # Audited with counts and hashes, never a path.
    [record] = events(site, "dataset.registered")
    assert record["object"] == {"type": "dataset", "id": "ct", "sha256": registry.manifest_sha256}
    assert record["details"]["cases"] == 5 and record["details"]["source"] == "images"
    assert str(data) not in json.dumps(record)
    verify_log(site / "audit")


def _series_uid(path: str) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


def test_ids_are_stable_at_a_site_and_unlinkable_across_sites(capsys, tmp_path, data):
    sites = [init_site(tmp_path / f"s{i}", f"hospital{i}").root for i in range(2)]
    first = add(capsys, sites[0], data)
    again = add(capsys, sites[0], data)
    other = add(capsys, sites[1], data)
    assert first["manifest_sha256"] == again["manifest_sha256"] and again["replaced"]
    ids = [{c.case_id for c in load_registry(s / "datasets" / "ct" / "registry.json").cases} for s in sites]
    assert ids[0] and not ids[0] & ids[1]
    assert first["manifest_sha256"] != other["manifest_sha256"]


def test_datalist_registration_keeps_split_and_the_datalist(capsys, site, data):
    code, out, err = cli(capsys, "silo", "dataset", "add", "dl", "--site", site, "--datalist", data / "datalist.json", "--task", "seg3d")
    assert code == 0 and "registered at site hospital0: 5 case(s), 4 training + 1 test" in out
    entry = Site.open(site).dataset("dl")
    assert entry.datalist == (data / "datalist.json").resolve() and entry.registry == site / "datasets" / "dl" / "registry.json"


def test_nothing_usable_exits_2_with_the_list_written(capsys, site, tmp_path):
    empty = tmp_path / "export"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("scanner notes")
    code, out, err = cli(capsys, "silo", "dataset", "add", "ct", "--site", site, "--images", empty, "--task", "cls3d",
                         "--labels", _csv(tmp_path, "image,label\nreadme,1\n"))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "no usable case found" in err and "rejections.json" in err
    listed = json.loads((site / "datasets" / "ct" / "rejections.json").read_text())["rejections"]
    assert {(Path(r["path"]).name, r["kind"]) for r in listed} == {("readme.txt", "not-image-file"), ("sub", "empty-folder")}
    assert "ct" not in Site.open(site).datasets
    for argv in (["--task", "seg3d"], ["--images", empty, "--datalist", empty, "--task", "seg3d"],
                 ["--images", empty / "nope", "--labels", empty, "--task", "seg3d"], ["--images", empty, "--task", "seg3d"]):
        code, out, err = cli(capsys, "silo", "dataset", "add", "ct", "--site", site, *argv)
        assert code == 2 and "fix:" in err and "Traceback" not in err, err


def _csv(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "classes.csv"
    path.write_text(text)
    return path


def test_classification_from_a_csv(capsys, site, tmp_path):
    images = tmp_path / "nifti"
    images.mkdir()
    for i in range(6):
        nib.save(nib.Nifti1Image(np.full((8, 8, 8), i, np.float32), np.eye(4)), images / f"p{i}.nii.gz")
    rows = "".join(f"p{i},{i % 2}\n" for i in range(6))
    code, out, err = cli(capsys, "silo", "dataset", "add", "xr", "--site", site, "--images", images, "--labels",
                         _csv(tmp_path, "image,label\n" + rows), "--task", "cls3d", "--json")
    assert code == 0, err
    registry = load_registry(site / "datasets" / "xr" / "registry.json")
    assert registry.counts["classes"] == {"0": 3, "1": 3} and {c.label_class for c in registry.cases} == {0, 1}


def test_list_show_check_and_remove(capsys, site, data):
    add(capsys, site, data)
    code, out, _ = cli(capsys, "silo", "dataset", "list", "--site", site, "--json")
    assert [(d["dataset"], d["cases"], d["source"]) for d in json.loads(out)["datasets"]] == [("ct", 5, "images")]
    code, out, _ = cli(capsys, "silo", "dataset", "show", "ct", "--site", site)
    assert code == 0 and "cases: 5" in out and "shapes: 16x16x16 (5)" in out and "spacing (mm): 1 x 1 x 1" in out

    code, out, _ = cli(capsys, "silo", "dataset", "check", "ct", "--site", site, "--json")
    assert code == 0 and json.loads(out)["clean"] and json.loads(out)["unchanged"] == 5

    files = sorted((data / "images").rglob("*.dcm"))
    os.utime(files[0], ns=(1, 1))  # touched, same bytes: not drift, the fingerprint is refreshed
    code, out, _ = cli(capsys, "silo", "dataset", "check", "ct", "--site", site, "--json")
    assert code == 0 and json.loads(out)["touched"] == 1
    with open(files[1], "r+b") as fh:  # one byte of pixel data changed
        fh.seek(-1, os.SEEK_END)
        fh.write(b"\x07")
    (data / "images" / "new-series").mkdir()
    shutil.copy(files[2], data / "images" / "new-series" / "x.dcm")
    code, out, _ = cli(capsys, "silo", "dataset", "check", "ct", "--site", site)
    assert code == 1 and "CHANGED since registration: 1 case(s)" in out and "NEW files under the registered folders: 1" in out

    # Train once to fill the cache, then remove: the registry and its cache go, the sources stay.
    from pipelines.dataset import load_cases

    shutil.rmtree(data / "images" / "new-series")
    add(capsys, site, data)
    site_obj = Site.open(site)
    registry = load_registry(site_obj.dataset("ct").registry)
    load_cases(registry.case_sources("training"), task="seg3d", cache_dir=site_obj.cache_dir)
    assert list(site_obj.cache_dir.rglob("*.npz"))
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    code, out, _ = cli(capsys, "silo", "dataset", "remove", "ct", "--site", site)
    assert code == 0 and "source files untouched" in out
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before
    assert not list(site_obj.cache_dir.rglob("*.npz")) and not (site / "datasets" / "ct").exists()
    assert "ct" not in Site.open(site).datasets
    [removed] = events(site, "dataset.removed")
    assert removed["object"]["id"] == "ct" and removed["details"]["cases"] == 5 and str(data) not in json.dumps(removed)
    verify_log(site / "audit")


def test_a_legacy_entry_still_opens(capsys, site, data):
    raw = yaml.safe_load((site / "site.yaml").read_text())
    raw["datasets"] = {"old": {"task": "seg3d", "datalist": str(data / "datalist.json")}}
    (site / "site.yaml").write_text(yaml.safe_dump(raw))
    entry = Site.open(site).dataset("old")
    assert entry.registry is None and entry.datalist == data / "datalist.json"
    code, out, _ = cli(capsys, "silo", "dataset", "list", "--site", site)
    assert code == 0 and "datalist (legacy entry)" in out
