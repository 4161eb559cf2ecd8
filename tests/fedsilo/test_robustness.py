"""The robustness harness: its output format, and that its attacks really move the result."""

import json

import numpy as np
import pytest
import torch

from coordinator.aggregation import RULES
from fedsilo.cli import main
from fedsilo.errors import ConfigError
from fedsilo.robustness import BACKDOOR_HIT, BenchConfig, backdoor_success, rule_args, run_robustness_bench

TINY = BenchConfig(size=16, train_cases=16, test_cases=4, rounds=2, batch_size=4)
RULES_UNDER_TEST = ["fedavg"] + (["median"] if "median" in RULES else [])


@pytest.fixture(scope="module")
def tiny():
    lines = []
    result = run_robustness_bench(silos=5, malicious=1, rounds=None, seeds=1, attacks=["gaussian", "backdoor"],
                                  rules=RULES_UNDER_TEST, progress=True, config=TINY, log=lines.append)
    return result, lines


def rows_by(result):
    return {(r["case"], r["metric"]): r for r in result["rows"]}


def test_result_has_the_benchmark_format(tiny):
    result, _ = tiny
    assert set(result) == {"bench", "params", "machine", "rows"}
    assert result["bench"] == "robustness"
    json.dumps(result, allow_nan=False)  # plain JSON
    p = result["params"]
    assert (p["silos"], p["malicious"], p["seeds"], p["rounds"]) == (5, 1, 1, 2)
    assert p["attacks"] == ["none", "gaussian", "backdoor"]  # the clean baseline is always run
    assert p["dp"] is False
    assert len(p["malicious_silos_per_seed"][0]) == 1
    assert result["machine"]["cpus"] >= 1 and result["machine"]["torch"]
    for row in result["rows"]:
        assert set(row) == {"case", "metric", "value", "baseline", "ratio"}
        if row["baseline"] is None:
            assert row["ratio"] is None


def test_rows_cover_every_cell_with_ratios_against_clean_fedavg(tiny):
    result, lines = tiny
    rows = rows_by(result)
    for rule in RULES_UNDER_TEST:
        for attack in ("none", "gaussian", "backdoor"):
            for metric in ("dice_mean", "dice_worst"):
                row = rows[(f"{rule}/{attack}", metric)]
                assert 0.0 <= row["value"] <= 1.0
                assert row["baseline"] == "fedavg/none"
                base = rows[("fedavg/none", metric)]["value"]
                assert row["ratio"] == pytest.approx(row["value"] / base, abs=2e-3)
        success = rows[(f"{rule}/backdoor", "success_rate")]
        assert success["baseline"] == f"{rule}/none" and 0.0 <= success["value"] <= 1.0
        assert rows[(f"{rule}/none", "success_rate")]["baseline"] is None
        assert (f"{rule}/all-attacks", "dice_worst") in rows
    assert rows[("total", "wall_seconds")]["value"] > 0
    assert len(lines) == 3 * len(RULES_UNDER_TEST)  # one progress line per cell
    assert all(line.startswith("robustness: ") for line in lines)


def test_summary_is_computed_from_the_rows(tiny):
    result, _ = tiny
    rows, summary = rows_by(result), result["params"]["summary"]
    clean = rows[("fedavg/none", "dice_mean")]["value"]
    broken = [a for a in ("gaussian", "backdoor") if (clean - rows[(f"fedavg/{a}", "dice_mean")]["value"]) * 100 >= 10]
    assert summary["fedavg_breaks_under"] == broken
    if "median" in RULES_UNDER_TEST:
        assert summary["best_robust_rule"] == "median"
        worst = min(rows[(f"median/{a}", "dice_worst")]["value"] for a in ("none", "gaussian", "backdoor"))
        assert rows[("summary/best-robust", "dice_worst")]["value"] == pytest.approx(worst, abs=1e-4)
        gap = (rows[("fedavg/none", "dice_worst")]["value"] - worst) * 100
        assert rows[("summary/gap-to-clean-fedavg", "dice_points")]["value"] == pytest.approx(gap, abs=0.02)
        assert summary["goal_met"] == (gap <= 2.0 and bool(broken))


def test_the_harness_is_not_vacuous(tiny):
    """Gaussian Byzantine vectors (std 200) wreck a plain mean; a median shrugs them off."""
    rows = rows_by(tiny[0])
    clean = rows[("fedavg/none", "dice_mean")]["value"]
    attacked = rows[("fedavg/gaussian", "dice_mean")]["value"]
    assert clean > 0.5  # the federation learns something in two rounds
    assert attacked < clean - 0.2
    assert "gaussian" in tiny[0]["params"]["summary"]["fedavg_breaks_under"]
    if "median" in RULES_UNDER_TEST:
        assert rows[("median/gaussian", "dice_mean")]["value"] > attacked + 0.2


def test_backdoor_success_counts_images_with_the_trigger_square_predicted_foreground():
    triggered = np.zeros((4, 1, 16, 16), dtype=np.float32)

    class Const(torch.nn.Module):
        def __init__(self, logit):
            super().__init__()
            self.logit = logit

        def forward(self, x):
            return torch.full_like(x, self.logit)

    assert backdoor_success(Const(5.0), triggered) == 1.0
    assert backdoor_success(Const(-5.0), triggered) == 0.0
    assert 0.5 < BACKDOOR_HIT < 1.0


def test_rule_args_follow_the_number_of_malicious_silos():
    assert rule_args("fedavg", 10, 2, 1.0) == {}
    assert rule_args("krum", 10, 2, 1.0) == {"f": 2}
    assert rule_args("multikrum", 10, 2, 1.0) == {"f": 2, "m": 8}
    assert int(rule_args("trimmed_mean", 10, 2, 1.0)["beta"] * 10) == 2
    assert int(rule_args("trimmed_mean", 7, 2, 1.0)["beta"] * 7) == 2
    assert rule_args("centered_clipping", 10, 2, 2.5) == {"tau": 2.5, "iters": 1}
    assert rule_args("norm_bounded_mean", 10, 2, 2.5) == {"max_norm": 2.5}


@pytest.mark.parametrize("kwargs, message", [
    ({"silos": 3, "malicious": 3}, "no honest silo"),
    ({"silos": 3, "malicious": 0}, "too small"),
    ({"silos": 3, "malicious": 1, "attacks": ["nope"]}, "unknown attack"),
    ({"silos": 3, "malicious": 1, "rules": ["nope"]}, "unknown rule"),
    ({"silos": 3, "malicious": 1, "rounds": 0}, "too small"),
])
def test_bad_arguments_are_config_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        run_robustness_bench(**{"seeds": 1, "rounds": None, "attacks": None, "rules": None, "progress": False, **kwargs})


def test_cli_refuses_bad_input_with_exit_2(capsys):
    assert main(["bench", "robustness", "--silos", "4", "--malicious", "4"]) == 2
    assert "no honest silo" in capsys.readouterr().err
    assert main(["bench", "robustness", "--attacks", "sign_flip,nope"]) == 2


@pytest.mark.skipif("krum" not in RULES, reason="krum not registered")
def test_a_rule_that_cannot_run_with_so_few_silos_is_skipped_and_named():
    result = run_robustness_bench(silos=2, malicious=1, rounds=1, seeds=1, attacks=["sign_flip"], rules=["krum"],
                                  progress=False, config=TINY)
    assert "krum" in result["params"]["skipped_rules"]  # needs n >= 2f + 3 even with f = 0
    assert {r["case"] for r in result["rows"] if r["metric"] == "dice_mean"} == {"fedavg/none"}
