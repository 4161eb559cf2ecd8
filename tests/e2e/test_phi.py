"""No PHI leaves the header: plant it with `fedsilo synth`, register through the CLI, run a federated round
through a real SuperLink and SuperNodes, then search everything the silos wrote and everything the coordinator
received (its run folder, audit log, logs, Flower's state) for every planted value.

The planted values are read back from the DICOM headers with pydicom (not taken from the generator's own
list). Digit-only values (dates) are searched as whole numbers, so that a hex digest that happens to hold
eight digits in a row is not mistaken for a birth date.
"""

from __future__ import annotations

import re
from pathlib import Path

import pydicom
import pytest
import yaml

from compliance import AuditLog
from fedsilo.cli import main
from fedsilo.demo import sign_and_approve
from fedsilo.local_federation import LocalFederation, SiloSpec
from silo_agent.site import Site

pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("e2e-a")]

PHI_KEYWORDS = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyDate", "ReferringPhysicianName",
                "InstitutionName", "ImageComments")


def _cli(capsys, transcript: list[str], *argv) -> int:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    transcript += [out, err]
    assert "Traceback" not in err
    return code


def _planted(data: Path) -> set[str]:
    values = set()
    for path in data.rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        values |= {str(ds.data_element(k).value) for k in PHI_KEYWORDS if k in ds}
    return {v for v in values if len(v) >= 4}


def _pattern(phi: set[str]) -> re.Pattern[bytes]:
    """One regex for every value (UTF-8 and UTF-16); digit-only values must stand alone (not inside a hex digest)."""
    words = [re.escape(v.encode()) for v in phi if not v.isdigit()]
    words += [re.escape(v.encode("utf-16-le")) for v in phi if not v.isdigit()]
    numbers = [rb"(?<![0-9A-Fa-f])" + re.escape(v.encode()) + rb"(?![0-9A-Fa-f])" for v in phi if v.isdigit()]
    return re.compile(b"|".join(sorted(words + numbers, key=len, reverse=True)))


def _leaks(blob: bytes, pattern: re.Pattern[bytes]) -> list[str]:
    return sorted({m.group().decode("utf-8", "replace") for m in pattern.finditer(blob)})


def test_no_planted_phi_in_anything_the_silos_wrote_or_sent(tmp_path, capsys, e2e_plan):
    transcript: list[str] = []
    data = tmp_path / "data"
    assert _cli(capsys, transcript, "synth", data, "--silos", "2", "--sizes", "10,10", "--size", "16") == 0
    phi = _planted(data)
    assert len(phi) > 40 and any(v.startswith("Pt ") for v in phi)  # names, MRNs, dates, free text
    pattern = _pattern(phi)
    sample = next(data.rglob("*.dcm")).read_bytes()
    assert len(_leaks(sample, pattern)) >= 6  # the search finds what a header holds
    assert not [p for p in data.rglob("*") if _leaks(str(p.relative_to(data)).encode(), pattern)]  # no PHI in folder names

    sites = []
    for name in ("hospital0", "hospital1"):
        site = tmp_path / "sites" / name
        assert _cli(capsys, transcript, "silo", "init", site, "--site", name) == 0
        assert _cli(capsys, transcript, "silo", "dataset", "add", "synthetic", "--site", site, "--images", data / name / "images",
                    "--labels", data / name / "labels", "--task", "seg3d") == 0
        for command in ("show", "check"):
            assert _cli(capsys, transcript, "silo", "dataset", command, "synthetic", "--site", site) == 0
        sites.append(Site.open(site))

    # Bad input carrying PHI: errors and rejection reasons name the file and the tag keyword, never a value.
    bad = tmp_path / "bad-export"
    bad.mkdir()
    for i, src in enumerate(sorted((data / "hospital0" / "images" / "case-0000").iterdir())[:4]):
        raw = src.read_bytes()
        if i == 0:
            raw = raw[:-64]  # truncated
        if i == 1:
            assert b"-7.5\\-7.5\\" in raw and str(pydicom.dcmread(src, stop_before_pixels=True).PatientName).encode() in raw
            raw = raw.replace(b"-7.5\\-7.5\\", b"x7.5\\-7.5\\", 1)  # a malformed ImagePositionPatient
        (bad / f"{i}.dcm").write_bytes(raw)
    assert _cli(capsys, transcript, "silo", "dataset", "add", "bad", "--site", sites[0].root, "--images", bad,
                "--labels", data / "hospital0" / "labels", "--task", "seg3d") == 2
    rejections = (sites[0].root / "datasets" / "bad" / "rejections.json").read_text()
    assert "ImagePositionPatient" in rejections and "PixelData holds" in rejections

    plan = yaml.safe_load(e2e_plan.read_text())
    plan["federation"]["rounds"] = 1
    e2e_plan.write_text(yaml.safe_dump(plan))
    bundle = sign_and_approve(tmp_path, e2e_plan, sites)
    out = tmp_path / "run"
    with LocalFederation(tmp_path, [SiloSpec(s.site_id, s.root) for s in sites], isolation="warm") as fed:
        fed.run_plan(bundle, out, timeout_s=600)
    for s in sites:  # the round read the registered cases through the cache
        assert list(s.cache_dir.rglob("*.npz"))

    # Everything written outside the source data: site folders (registry, cache, audit, ledger, logs), the
    # coordinator's run folder (audit, logs, metrics, model), Flower's homes and state, process logs.
    written = [p for p in tmp_path.rglob("*") if p.is_file() and data not in p.parents and bad not in p.parents]
    assert any(p.suffix == ".npz" for p in written) and any(p.name == "registry.json" for p in written)
    leaked = {str(p): _leaks(p.read_bytes(), pattern) for p in written}
    assert not {p: v for p, v in leaked.items() if v}
    assert not _leaks("".join(transcript).encode(), pattern)

    # Hospital paths may sit in a site's registry, never in an audit record or anything the coordinator holds.
    source = str(data).encode()
    for s in sites:
        with AuditLog.open(s.audit_dir, read_only=True) as log:
            assert source not in b"".join(leaf for _, leaf, _ in log.rows())
    for p in written:
        if out in p.parents or (tmp_path / "logs") in p.parents or (tmp_path / "flwr") in p.parents:
            assert source not in p.read_bytes(), p
