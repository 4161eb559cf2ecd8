"""The noise multiplier remembered in a silo's cache folder: the same answer as Opacus' search, reused across
processes, and never trusted when it would overspend (a tampered or stale entry is searched again)."""

import json

import pytest

from pipelines import training
from pipelines.plan import parse_plan
from pipelines.training import NOISE_CACHE_FILE, composed_epsilon, plan_noise_multiplier, plan_steps, planned_round_entry, sample_rate

PLAN = parse_plan({"name": "t", "task": "seg2d", "model": {"network": "UNet", "args": {"channels": [4, 8], "strides": [2]}},
                   "training": {"local_epochs": 2, "batch_size": 4}, "privacy": {"target_epsilon": 3.0}, "federation": {"rounds": 3}})
CASES = 4  # one batch: sample rate 1, where the accountant is quick (the logic does not depend on it)


def _searches(monkeypatch) -> list:
    calls = []
    real = training._noise_multiplier.__wrapped__

    def counted(*key):
        calls.append(key)
        return real(*key)

    monkeypatch.setattr(training, "_noise_multiplier", counted)
    return calls


def test_the_remembered_value_is_opacus_search_and_is_reused(tmp_path, monkeypatch):
    searched = plan_noise_multiplier(PLAN, CASES)  # the in-process search
    calls = _searches(monkeypatch)
    first = plan_noise_multiplier(PLAN, CASES, cache_dir=tmp_path)
    assert first == searched and len(calls) == 1
    again = plan_noise_multiplier(PLAN, CASES, cache_dir=tmp_path)  # as a fresh process would: from the file
    assert again == first and len(calls) == 1
    assert planned_round_entry(PLAN, CASES, cache_dir=tmp_path)[0] == first and len(calls) == 1
    entries = json.loads((tmp_path / NOISE_CACHE_FILE).read_text())
    assert list(entries.values()) == [first]


def test_an_entry_that_would_overspend_is_searched_again(tmp_path, monkeypatch):
    honest = plan_noise_multiplier(PLAN, CASES, cache_dir=tmp_path)
    path = tmp_path / NOISE_CACHE_FILE
    [name] = json.loads(path.read_text())
    path.write_text(json.dumps({name: honest / 2}))  # half the noise: far more than epsilon 3
    rate = sample_rate(PLAN, CASES)
    assert composed_epsilon([(honest / 2, rate, plan_steps(6, rate))], delta=1e-5, accountant="rdp") > 3.0
    calls = _searches(monkeypatch)
    assert plan_noise_multiplier(PLAN, CASES, cache_dir=tmp_path) == honest and len(calls) == 1
    assert json.loads(path.read_text()) == {name: honest}  # repaired


@pytest.mark.parametrize("content", ["not json", "[1, 2]", json.dumps({"x": "y"})])
def test_an_unreadable_cache_costs_only_a_search(tmp_path, content):
    (tmp_path / NOISE_CACHE_FILE).write_text(content)
    assert plan_noise_multiplier(PLAN, CASES, cache_dir=tmp_path) == plan_noise_multiplier(PLAN, CASES)


def test_the_search_counts_every_step_of_the_plan():
    # 3 epochs of 75 batches: Opacus' epochs -> steps conversion, int(3 / (1 / 75)), gives 224; the plan takes 225.
    rate = 1 / 75
    assert int(3 / rate) == 224 and plan_steps(3, rate) == 225
    sigma = training._noise_multiplier(8.0, 1e-5, rate, 3, "rdp")
    assert composed_epsilon([(sigma, rate, 225)], delta=1e-5, accountant="rdp") <= 8.0
