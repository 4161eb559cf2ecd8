"""``fedsilo bench ingest`` at a tiny size: the rows, their baselines and ratios (no timing is asserted)."""

from __future__ import annotations

import json

import pydicom

from fedsilo.cli import main
from pipelines.ingest_bench import write_dicom_files


def test_generated_files_are_valid_dicom_series(tmp_path):
    paths = write_dicom_files(tmp_path, 7, slices_per_series=3)
    assert [p.parent.name for p in paths] == ["series-00000"] * 3 + ["series-00001"] * 3 + ["series-00002"]
    datasets = [pydicom.dcmread(p) for p in paths]
    assert len({str(d.SOPInstanceUID) for d in datasets}) == 7 and len({str(d.SeriesInstanceUID) for d in datasets}) == 3
    assert [float(d.ImagePositionPatient[2]) for d in datasets[:3]] == [0.0, 1.0, 2.0]
    assert datasets[4].InstanceNumber == 2 and datasets[0].pixel_array.shape == (32, 32)


def test_bench_ingest_json(capsys):
    code = main(["bench", "ingest", "--files", "60", "--slices-per-series", "20", "--cases", "2", "--size", "16",
                 "--repeats", "1", "--json"])
    out, err = capsys.readouterr()
    assert code == 0 and err == ""
    result = json.loads(out)
    assert result["bench"] == "ingest" and result["params"]["files"] == 60 and result["machine"]["cpus"] >= 1
    rows = {(r["case"], r["metric"]): r for r in result["rows"]}
    plain = rows[("pydicom.dcmread loop (stop_before_pixels)", "files/s")]
    ours = rows[("our scan, 1 worker", "files/s")]
    assert plain["baseline"] is None and plain["value"] > 0
    assert ours["baseline"] == plain["case"] and abs(ours["ratio"] - ours["value"] / plain["value"]) < 0.01 * ours["ratio"] + 1e-3
    cached = next(r for r in result["rows"] if r["case"].startswith("cached epoch"))
    assert cached["baseline"].startswith("first epoch") and cached["ratio"] is not None and cached["value"] >= 0
    for r in result["rows"]:
        assert set(r) == {"case", "metric", "value", "baseline", "ratio"}


def test_bench_ingest_bad_input(capsys):
    assert main(["bench", "ingest", "--files", "0"]) == 2
    assert "--files 0 is too small" in capsys.readouterr().err
