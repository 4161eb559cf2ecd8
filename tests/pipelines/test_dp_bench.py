"""pipelines.dp_bench: the benchmark object of DESIGN.md on tiny shapes, skipped modes, bad input
(the real figures come from `fedsilo bench dp`)."""

from __future__ import annotations

import pytest

from fedsilo.errors import ConfigError
from pipelines.dp_bench import BENCH_PLANS, MODES, run_dp_bench
from pipelines.networks import NETWORKS

TINY = {"UNet": {"channels": [4, 8], "strides": [2]}}
KEYS = {"case", "metric", "value", "baseline", "ratio"}


def _check_format(result: dict) -> dict[tuple[str, str], dict]:
    assert result["bench"] == "dp"
    assert {"cpus", "torch", "opacus", "monai", "device", "device_name"} <= set(result["machine"])
    for key in ("networks", "batch_sizes", "repeats", "device", "input_shapes", "noise_multiplier", "max_grad_norm",
                "poisson_sampling"):
        assert key in result["params"]
    by_key = {}
    for row in result["rows"]:
        assert set(row) == KEYS
        by_key[(row["case"], row["metric"])] = row
    for row in result["rows"]:
        if row["baseline"] is None:
            assert row["ratio"] is None
        elif row["ratio"] is not None:
            base = by_key[(row["baseline"], row["metric"])]
            assert row["ratio"] == pytest.approx(row["value"] / base["value"], rel=2e-3)
    return by_key


def test_isolated_cases_give_times_memory_and_ratios() -> None:
    # Each case in a fresh child process: a non-private baseline and one DP mode.
    result = run_dp_bench(networks=["UNet"], batch_sizes=[2], repeats=1, device="cpu", progress=False,
                          modes=["hooks"], size=16, network_args=TINY)
    rows = _check_format(result)
    assert result["params"]["input_shapes"] == {"UNet": [1, 16, 16, 16]} and result["params"]["poisson_sampling"] is False
    base = rows[("UNet b=2 non-private", "step seconds")]
    dp = rows[("UNet b=2 hooks", "step seconds")]
    assert base["value"] > 0 and base["baseline"] is None
    assert dp["baseline"] == "UNet b=2 non-private" and dp["ratio"] > 0
    assert rows[("UNet b=2 hooks", "peak RSS MiB")]["ratio"] > 0
    assert rows[("UNet b=2 non-private", "peak RSS MiB")]["value"] > 0
    # at this tiny size the non-private step may add no measurable RSS: then the row has no ratio
    extra, base_extra = rows[("UNet b=2 hooks", "peak extra RSS MiB")], rows[("UNet b=2 non-private", "peak extra RSS MiB")]
    assert extra["value"] >= 0 and (extra["ratio"] is None) == (not base_extra["value"])
    chosen = [r for r in result["rows"] if "fastest DP mode" in r["case"]]
    assert len(chosen) == 1 and "hooks" in chosen[0]["case"] and chosen[0]["value"] == dp["ratio"]


def test_a_mode_that_fails_is_reported_skipped_not_raised() -> None:
    # Expanded weights cannot handle UNet's PReLU: a "skipped: reason" row, and the other mode still runs.
    result = run_dp_bench(networks=["UNet"], batch_sizes=[2], repeats=1, device="cpu", progress=False,
                          modes=["ew", "functorch"], size=16, network_args=TINY, isolate=False)
    rows = _check_format(result)
    skipped = [r for r in result["rows"] if r["case"] == "UNet b=2 ew"]
    assert len(skipped) == 1 and skipped[0]["metric"].startswith("skipped: ") and "prelu" in skipped[0]["metric"]
    assert skipped[0]["value"] is None and skipped[0]["ratio"] is None
    assert rows[("UNet b=2 functorch", "step seconds")]["ratio"] > 0
    assert any(r["case"].startswith("UNet fastest DP mode: functorch") for r in result["rows"])


def test_ghost_clipping_runs_with_the_per_sample_loss() -> None:
    result = run_dp_bench(networks=["UNet"], batch_sizes=[3], repeats=1, device="cpu", progress=False,
                          modes=["ghost"], size=16, network_args=TINY, isolate=False)
    rows = _check_format(result)
    assert rows[("UNet b=3 ghost", "step seconds")]["value"] > 0


def test_every_allow_listed_network_has_a_bench_plan_and_the_unet_is_the_demos() -> None:
    from pipelines.plan import load_plan
    from pathlib import Path

    assert set(BENCH_PLANS) == set(NETWORKS)
    demo = load_plan(Path(__file__).resolve().parents[2] / "configs" / "plans" / "seg3d-unet-dp.yaml")
    unet = BENCH_PLANS["UNet"]
    assert unet["task"] == demo.task and unet["size"] == 32 and unet["loss"] == demo.training.loss
    assert {k: list(v) for k, v in demo.model.args.items()} == unet["args"]
    assert set(MODES) == {"hooks", "functorch", "ew", "ghost"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"networks": ["ResNet50"]}, "'ResNet50' is not an allow-listed network.*UNet, BasicUNet"),
        ({"batch_sizes": [0]}, "batch sizes"),
        ({"repeats": 0}, "repeats 0"),
        ({"modes": ["vmap"]}, "not known.*hooks, functorch, ew, ghost"),
        ({"device": "tpu"}, "device 'tpu'"),
    ],
)
def test_bad_input_is_refused_before_anything_runs(kwargs, match) -> None:
    args = {"networks": ["UNet"], "batch_sizes": [2], "repeats": 1, "device": "cpu", "progress": False, **kwargs}
    with pytest.raises(ConfigError, match=match):
        run_dp_bench(**args)


def test_cuda_without_a_gpu_says_so(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA device"):
        run_dp_bench(networks=["UNet"], batch_sizes=[2], repeats=1, device="cuda", progress=False)


def test_cli_refuses_an_unknown_network_in_one_line(capsys) -> None:
    from fedsilo.cli import main

    code = main(["bench", "dp", "--networks", "UNet,Nope", "--batch-sizes", "2", "--repeats", "1", "--json"])
    err = capsys.readouterr().err
    assert code == 2
    assert "'Nope' is not an allow-listed network" in err and "UNet" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
