"""Norm-bounded mean: hand-checked clipping, the norm over all tensors, dtypes, argument errors,
and the bound on the aggregate's norm whatever the silos send."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.aggregation.fedavg import weighted_mean
from coordinator.aggregation.norm_bounded_mean import NormBoundedMean
from fedsilo.errors import ConfigError


def test_clips_a_known_vector():
    rule = NormBoundedMean(max_norm=1.0)
    out = rule.aggregate([{"w": np.array([3.0, 4.0], dtype=np.float32)}], [7.0])
    assert out["w"].dtype == np.float32
    np.testing.assert_allclose(out["w"], [0.6, 0.8], rtol=1e-6)
    assert rule.details == {"clipped": [0]}


def test_clipped_then_weighted_mean_by_hand():
    # (3, 4) -> (0.6, 0.8) at weight 1; (0, 0.5) kept at weight 3: (0.15, 0.2 + 0.375).
    rule = NormBoundedMean(max_norm=1.0)
    out = rule.aggregate([{"w": np.array([3.0, 4.0])}, {"w": np.array([0.0, 0.5])}], [1.0, 3.0])
    np.testing.assert_allclose(out["w"], [0.15, 0.575])
    assert rule.details["clipped"] == [0]


def test_norm_is_over_all_tensors_together():
    out = NormBoundedMean(max_norm=2.5).aggregate([{"a": np.array([3.0]), "b": np.array([[4.0]])}], [1.0])
    np.testing.assert_allclose(out["a"], [1.5])  # per tensor, "a" (norm 3) would become 2.5
    np.testing.assert_allclose(out["b"], [[2.0]])


def test_large_bound_is_the_weighted_mean():
    rs = np.random.RandomState(0)
    ups = [{"w": rs.randn(5).astype(np.float32), "n": np.array([i], dtype=np.int64)} for i in range(4)]
    rule = NormBoundedMean(max_norm=1e9)
    out = rule.aggregate(ups, [1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(out["w"], weighted_mean(zip(ups, [1.0, 2.0, 3.0, 4.0]))["w"], rtol=1e-6)
    assert out["n"].dtype == np.int64 and out["n"].tolist() == [2]  # rounded, not truncated: 20/10
    assert rule.details["clipped"] == []


def test_huge_finite_update_is_clipped_exactly():
    out = NormBoundedMean(max_norm=1.0).aggregate([{"w": np.array([1e200, 1e200])}], [1.0])
    np.testing.assert_allclose(out["w"], [2**-0.5, 2**-0.5], rtol=1e-12)


@pytest.mark.parametrize("args, key, what", [({}, "max_norm", "required"), ({"max_norm": 0.0}, "max_norm", "out of range"),
                                             ({"max_norm": float("inf")}, "max_norm", "out of range"),
                                             ({"max_norm": None}, "max_norm", "not a number"),
                                             ({"max_norm": 1, "norm": 2}, "norm", "unknown argument")])
def test_bad_args_name_the_plan_key(args, key, what):
    with pytest.raises(ConfigError, match=rf"federation\.aggregation\.args\.{key}'.*{what}"):
        NormBoundedMean(**args)


row = st.lists(st.one_of(st.floats(-10, 10, allow_nan=False), st.sampled_from([1e30, -1e30])), min_size=4, max_size=4)


@settings(max_examples=60, deadline=None)
@given(st.lists(row, min_size=1, max_size=7), st.floats(0.01, 100), st.randoms(use_true_random=False), st.data())
def test_aggregate_norm_is_bounded_and_order_free(rows, max_norm, rnd, data):
    """A weighted mean of vectors of norm <= max_norm has norm <= max_norm, whatever the silos send."""
    ws = data.draw(st.lists(st.floats(0.1, 10), min_size=len(rows), max_size=len(rows)))
    ups = [{"w": np.array(r, dtype=np.float32)} for r in rows]
    rule = NormBoundedMean(max_norm=max_norm)
    out = rule.aggregate(ups, ws)["w"]
    assert np.linalg.norm(out.astype(np.float64)) <= max_norm * (1 + 1e-6)
    norms = [np.linalg.norm(np.array(r)) for r in rows]
    clipped = set(rule.details["clipped"])
    assert {i for i, n in enumerate(norms) if n > max_norm * (1 + 1e-6)} <= clipped
    assert not clipped & {i for i, n in enumerate(norms) if n < max_norm * (1 - 1e-6)}
    idx = list(range(len(rows)))
    rnd.shuffle(idx)
    again = NormBoundedMean(max_norm=max_norm).aggregate([ups[i] for i in idx], [ws[i] for i in idx])["w"]
    np.testing.assert_allclose(again, out, rtol=1e-5, atol=1e-6 * max_norm)
