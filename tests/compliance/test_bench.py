"""compliance.bench: the benchmark object of DESIGN.md, on tiny sizes (the real figures come from the bench)."""

from __future__ import annotations

import pytest

from compliance.bench import run_audit_bench
from fedsilo.errors import ConfigError


def test_run_audit_bench_returns_the_design_format() -> None:
    result = run_audit_bench(append_records=300, verify_records=500, repeats=1)
    assert result["bench"] == "audit"
    assert result["params"]["append_records"] == 300 and result["params"]["verify_records"] == 500
    assert result["machine"]["cpus"] >= 1 and result["machine"]["python"]
    rows = {(r["case"], r["metric"]): r for r in result["rows"]}
    batched = rows[("append, batched (1000 per transaction)", "records/s")]
    unbatched = rows[("append, unbatched (one fsync each)", "records/s")]
    assert batched["baseline"] == "append, unbatched" and unbatched["baseline"] is None and unbatched["ratio"] is None
    assert batched["ratio"] == pytest.approx(batched["value"] / unbatched["value"], rel=1e-2)
    assert rows[("verify 500 records", "seconds")]["value"] > 0
    for row in result["rows"]:
        assert set(row) == {"case", "metric", "value", "baseline", "ratio"}
        assert (row["baseline"] is None) == (row["ratio"] is None)


def test_bad_bench_sizes_are_refused() -> None:
    with pytest.raises(ConfigError, match="verify_records must be a whole number >= 1"):
        run_audit_bench(append_records=1, verify_records=0, repeats=1)
