"""fedsilo.comm_bench: the demo model through the CLI (one repeat), the wire-size measure on hand-sized payloads,
bad input. No timing is asserted: the bench measures it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedsilo.cli import main
from fedsilo.comm_bench import wire_size
from pipelines.compression import MODES

KEYS = {"case", "metric", "value", "baseline", "ratio"}


@pytest.fixture(scope="module")
def demo_result() -> dict:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["bench", "comm", "--models", "demo", "--repeats", "1", "--json"])
    assert code == 0
    assert "bench comm: demo" in err.getvalue()  # progress on stderr, JSON alone on stdout
    return json.loads(out.getvalue())


def test_demo_rows_and_ratios(demo_result) -> None:
    result = demo_result
    assert result["bench"] == "comm" and {"cpus", "flwr", "numpy"} <= set(result["machine"])
    demo = result["params"]["models"]["demo"]
    assert demo["params"] == 28365 and demo["tensors"] == 14 and "DP-SGD" in demo["delta"]
    rows = {(r["case"], r["metric"]): r for r in result["rows"]}
    for r in result["rows"]:
        assert set(r) == KEYS
        assert (r["baseline"] is None) == (r["ratio"] is None)
    for mode in MODES:
        for metric in ("wire_bytes_per_update", "payload_bytes_per_update", "wire_objects_per_update",
                       "compress_seconds", "decompress_seconds", "relative_l2_error"):
            row = rows[(f"demo {mode}", metric)]
            assert row["value"] >= 0
            if mode == "float32" or metric == "relative_l2_error":
                assert row["baseline"] is None
            else:
                assert row["baseline"] == "demo float32"
                base = rows[("demo float32", metric)]["value"]
                assert row["ratio"] == pytest.approx(row["value"] / base, rel=1e-3)

    def ratio(mode: str, metric: str) -> float:
        return rows[(f"demo {mode}", metric)]["ratio"]

    # The data itself: float16 half, int8 a quarter plus 8 bytes per tensor, topk 8 bytes per kept entry
    # (k = ceil(1% of 28365) = 284).
    assert rows[("demo float32", "payload_bytes_per_update")]["value"] == 28365 * 4
    assert ratio("float16", "payload_bytes_per_update") == pytest.approx(0.5)
    assert ratio("int8", "payload_bytes_per_update") == pytest.approx(0.25, abs=0.005)
    assert rows[("demo topk", "payload_bytes_per_update")]["value"] == 284 * 8
    # On the wire each array adds its framing (a few hundred bytes), which weighs on a 14-tensor model:
    # still in the same order and well below float32.
    assert 0.5 <= ratio("float16", "wire_bytes_per_update") < 0.6
    assert 0.25 <= ratio("int8", "wire_bytes_per_update") < 0.45
    assert ratio("topk", "wire_bytes_per_update") < 0.1
    wire = {m: rows[(f"demo {m}", "wire_bytes_per_update")]["value"] for m in MODES}
    assert wire["topk"] < wire["int8"] < wire["float16"] < wire["float32"]
    # Errors: float32 exact, float16 ~1e-4, int8 ~1e-2, topk keeps 1% of entries (most of the norm is lost in one round).
    err = {m: rows[(f"demo {m}", "relative_l2_error")]["value"] for m in MODES}
    assert err["float32"] == 0.0 and 0 < err["float16"] < 1e-3 and err["float16"] < err["int8"] < 0.05 < err["topk"] < 1.0


def test_wire_size_counts_flower_objects() -> None:
    # One 1000-entry float32 array: the packed blob (safetensors header + 4000 bytes) in one chunk, plus the
    # Array's and the record's metadata objects. A second array joins the same blob: still 3 objects.
    one = {"a": np.zeros(1000, np.float32)}
    size1, objects1 = wire_size(one)
    assert objects1 == 3 and 4000 < size1 < 4000 + 1000
    size2, objects2 = wire_size({"a": np.zeros(1000, np.float32), "b": np.ones(1000, np.float32)})
    assert objects2 == 3 and size2 > size1 + 4000
    many, objects_many = wire_size({f"t{i}": np.ones(10, np.float32) for i in range(50)})
    assert objects_many == 3 and many < 50 * (40 + 150)  # about 80 bytes of header per array, no per-array object


def test_secure_rows_flag_is_wired(monkeypatch, capsys) -> None:
    # --federation calls _secure_round_rows (a real federation: fedsilo.secagg_bench; here a stand-in returning
    # rows and parameters as the real one does), whose rows and parameters join the result.
    import fedsilo.comm_bench as bench

    calls = []

    def secure_rows(args):
        calls.append(args)
        return [], {"silos": args.silos, "rounds": args.rounds}

    monkeypatch.setattr(bench, "_secure_round_rows", secure_rows)
    monkeypatch.setattr(bench, "BUILDERS", {**bench.BUILDERS, "demo": lambda seed: _tiny(seed)})
    assert main(["bench", "comm", "--models", "demo", "--modes", "int8", "--repeats", "1", "--federation", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(calls) == 1 and result["params"]["federation"] == {"silos": 3, "rounds": 3}
    assert {r["case"] for r in result["rows"]} == {"demo int8"}


def _tiny(seed: int):
    rng = np.random.default_rng(seed)
    ref = {"w": rng.standard_normal((64, 64)).astype(np.float32)}
    return ref, {"w": (rng.standard_normal((64, 64)) * 0.01).astype(np.float32)}, {"params": 4096, "tensors": 1}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--models", "demo,70B"], "--models: unknown model(s) 70B"),
        (["--modes", "int4"], "--modes: unknown mode(s) int4"),
        (["--repeats", "0"], "--repeats 0 is too small"),
        (["--topk-fraction", "1.5"], "--topk-fraction 1.5 must be in (0, 1]"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, message, capsys) -> None:
    code = main(["bench", "comm", *argv, "--json"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
