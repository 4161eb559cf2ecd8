"""coordinator.aggregation_bench: the benchmark object of DESIGN.md on tiny sizes, and the CLI's --json
(the real figures come from `fedsilo bench aggregate`)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from coordinator.aggregation import RULES
from coordinator.aggregation_bench import run_aggregate_bench
from fedsilo.errors import ConfigError


def test_run_aggregate_bench_returns_the_design_format() -> None:
    result = run_aggregate_bench(n=7, d=3000, f=2, repeats=1, seed=0)
    assert result["bench"] == "aggregate"
    assert result["params"]["n"] == 7 and result["params"]["d"] == 3000 and result["params"]["f"] == 2
    assert result["machine"]["cpus"] >= 1 and result["machine"]["flwr"] and result["machine"]["torch"]
    rows = {(r["case"], r["metric"], r["baseline"]): r for r in result["rows"]}
    for row in result["rows"]:
        assert set(row) == {"case", "metric", "value", "baseline", "ratio"}
        assert (row["baseline"] is None) == (row["ratio"] is None)
    assert rows[("copy", "seconds", None)]["ratio"] is None
    mean = rows[("mean", "seconds", "copy")]
    assert mean["ratio"] == pytest.approx(mean["value"] / rows[("copy", "seconds", None)]["value"], rel=1e-2)
    # every registered rule appears (Bulyan with the f that n = 7 allows), next to its Flower twin
    for case in ("median", "trimmed_mean (beta=0.2)", "krum (f=2)", "multikrum (f=2)", "bulyan (f=1)"):
        row = rows[(case, "seconds", "mean")]
        assert row["ratio"] == pytest.approx(row["value"] / mean["value"], rel=1e-2)
        assert rows[(case, "seconds", "copy")]["value"] == row["value"]
    assert rows[("flower Krum (f=2)", "seconds", "mean")]["value"] > 0
    assert rows[("bulyan (f=1)", "seconds", "flower Bulyan (f=1)")]["ratio"] >= 0  # rounded to 3 places: tiny d may give 0.0
    assert len({r["case"].split(" (")[0] for r in result["rows"] if r["baseline"] == "mean"}) >= len(RULES) - 1
    agreement = [r for r in result["rows"] if r["metric"] == "max relative difference"]
    assert len(agreement) == 5
    assert all(r["value"] <= 1e-6 for r in agreement)
    assert any(r["metric"] == "peak extra MiB" for r in result["rows"])


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ConfigError, match="d must be a whole number >= 1"):
        run_aggregate_bench(n=3, d=0, f=0, repeats=1, seed=0)


def test_cli_prints_one_json_object() -> None:
    proc = subprocess.run([sys.executable, "-m", "fedsilo.cli", "bench", "aggregate", "--n", "5", "--d", "1000",
                           "--repeats", "1", "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["bench"] == "aggregate" and result["params"]["n"] == 5
    assert {r["case"] for r in result["rows"]} >= {"copy", "mean", "median"}
