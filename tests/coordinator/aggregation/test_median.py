"""Coordinate-wise median: hand-checked numbers, dtype and shape kept, weights unused, argument errors,
permutation invariance, and the honest range held against f < n/2 arbitrary outliers."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.aggregation import build_rule
from coordinator.aggregation.median import Median
from fedsilo.errors import ConfigError


def test_odd_and_even_counts_by_hand():
    ups = [{"w": np.array([1.0, -3.0], dtype=np.float32)}, {"w": np.array([5.0, 0.0], dtype=np.float32)},
           {"w": np.array([2.0, 9.0], dtype=np.float32)}]
    rule = Median()
    out = rule.aggregate(ups, [1.0, 1.0, 1.0])
    assert out["w"].tolist() == [2.0, 0.0] and out["w"].dtype == np.float32
    assert rule.details == {}
    ups.append({"w": np.array([4.0, 1.0], dtype=np.float32)})
    assert rule.aggregate(ups, [1.0] * 4)["w"].tolist() == [3.0, 0.5]  # mean of the two middle values


def test_keeps_names_shapes_and_dtypes_and_ignores_weights():
    rs = np.random.RandomState(0)
    ups = [{"conv": rs.randn(2, 3, 4).astype(np.float32), "bias": rs.randn(5), "steps": np.array([i], dtype=np.int64)}
           for i in range(5)]
    out = Median().aggregate(ups, [1.0, 2.0, 3.0, 4.0, 1000.0])
    assert list(out) == ["conv", "bias", "steps"]
    assert out["conv"].shape == (2, 3, 4) and out["conv"].dtype == np.float32
    assert out["bias"].dtype == np.float64 and out["steps"].dtype == np.int64 and out["steps"].tolist() == [2]
    np.testing.assert_array_equal(out["conv"], np.median(np.stack([u["conv"] for u in ups]), axis=0))
    np.testing.assert_array_equal(out["bias"], np.median(np.stack([u["bias"] for u in ups]), axis=0))


@pytest.mark.parametrize("n", [1, 2, 3, 6, 10, 17])
def test_equals_numpy_median_across_chunks(n):
    rs = np.random.RandomState(n)
    ups = [{"w": rs.randn(40_000).astype(np.float32)} for _ in range(n)]  # more than two chunks
    out = build_rule("median").aggregate(ups, [1.0] * n)
    np.testing.assert_array_equal(out["w"], np.median(np.stack([u["w"] for u in ups]), axis=0))


def test_arguments_and_too_few_updates_are_refused():
    with pytest.raises(ConfigError, match=r"plan key 'federation.aggregation.args.beta': median has no argument"):
        build_rule("median", {"beta": 0.1})
    with pytest.raises(ConfigError, match="no updates"):
        Median().aggregate([], [])
    with pytest.raises(ConfigError, match="positive"):
        Median().aggregate([{"w": np.zeros(2)}], [0.0])
    with pytest.raises(ConfigError, match="shape"):
        Median().aggregate([{"w": np.zeros(2)}, {"w": np.zeros(3)}], [1.0, 1.0])
    assert Median().min_updates() == 1


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 9), seed=st.integers(0, 2**16), data=st.data())
def test_permutation_invariant(n, seed, data):
    rs = np.random.RandomState(seed)
    ups = [{"w": rs.randn(7).astype(np.float32)} for _ in range(n)]
    order = data.draw(st.permutations(range(n)))
    a = Median().aggregate(ups, [1.0] * n)["w"]
    b = Median().aggregate([ups[i] for i in order], [1.0] * n)["w"]
    np.testing.assert_array_equal(a, b)


@settings(max_examples=40, deadline=None)
@given(honest=st.integers(1, 8), data=st.data(), seed=st.integers(0, 2**16))
def test_outliers_stay_outside_when_fewer_than_half(honest, data, seed):
    f = data.draw(st.integers(0, honest - 1))  # f < n/2
    rs = np.random.RandomState(seed)
    good = [rs.randn(6).astype(np.float32) for _ in range(honest)]
    bad = [np.array(data.draw(st.lists(st.sampled_from([1e30, -1e30, 3e38, -3e38, 0.0, 7.5]), min_size=6, max_size=6)),
                    dtype=np.float32) for _ in range(f)]
    ups = [{"w": x} for x in good + bad]
    out = Median().aggregate(ups, [1.0] * len(ups))["w"]
    lo, hi = np.min(good, axis=0), np.max(good, axis=0)
    assert np.all(out >= lo) and np.all(out <= hi)
