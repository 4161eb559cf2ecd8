"""The secure-aggregation round bench: its two plans differ only in secure aggregation; bad sizes exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from fedsilo.round_bench import DEFAULT_PLAN
from fedsilo.secagg_bench import _plan_variants
from pipelines.plan import load_plan


def test_the_plain_and_secure_plans_differ_only_in_secure_aggregation(tmp_path: Path):
    paths = _plan_variants(DEFAULT_PLAN, tmp_path, rounds=2, silos=3)
    plain, secure = load_plan(paths["plain"]), load_plan(paths["secagg+"])
    assert (plain.federation.secure_aggregation, secure.federation.secure_aggregation) == ("none", "secagg+")
    assert plain.federation.rounds == secure.federation.rounds == 2 and plain.federation.min_silos == 3
    assert plain.federation.update_norm_bound == secure.federation.update_norm_bound is not None
    a, b = plain.to_dict(), secure.to_dict()
    for raw in (a, b):
        raw.pop("name")
        raw["federation"].pop("secure_aggregation", None)
    assert a == b  # same model, data, training, privacy and aggregation: the silos do the same work


def test_too_few_silos_for_secure_aggregation_is_bad_input():
    done = subprocess.run([sys.executable, "-m", "fedsilo.cli", "bench", "comm", "--models", "demo", "--modes", "float32",
                           "--repeats", "1", "--federation", "--silos", "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert "needs 3 or more silos" in done.stderr and "Traceback" not in done.stderr
