"""Coordinate-wise trimmed mean: hand-checked numbers, beta as Flower's (each end), argument errors,
permutation invariance, and the honest range held when beta >= f/n."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.aggregation import build_rule
from coordinator.aggregation.trimmed_mean import TrimmedMean
from fedsilo.errors import ConfigError


def test_trims_floor_beta_n_from_each_end_by_hand():
    ups = [{"w": np.array([v, -v], dtype=np.float32)} for v in (1.0, 2.0, 3.0, 4.0, 100.0)]
    rule = TrimmedMean(beta=0.2)  # int(0.2 * 5) = 1 from each end: mean of 2, 3, 4
    out = rule.aggregate(ups, [1.0, 1.0, 1.0, 1.0, 50.0])
    assert out["w"].tolist() == [3.0, -3.0] and out["w"].dtype == np.float32
    assert rule.details == {"trimmed_each_end": 1}
    assert TrimmedMean(beta=0.0).aggregate(ups, [1.0] * 5)["w"].tolist() == [22.0, -22.0]
    assert TrimmedMean(beta=0.19).aggregate(ups, [1.0] * 5)["w"].tolist() == [22.0, -22.0]  # int(0.95) = 0
    assert TrimmedMean(beta=0.49).aggregate(ups, [1.0] * 5)["w"].tolist() == [3.0, -3.0]  # int(2.45) = 2: the median
    assert build_rule("trimmed_mean").beta == 0.2


@pytest.mark.parametrize("n,beta", [(4, 0.25), (10, 0.2), (11, 0.3), (20, 0.1)])
def test_equals_sorted_slice_mean_across_chunks(n, beta):
    rs = np.random.RandomState(n)
    ups = [{"w": rs.randn(3, 12_000).astype(np.float32)} for _ in range(n)]
    k = int(beta * n)
    ref = np.sort(np.stack([u["w"] for u in ups]).astype(np.float64), axis=0)[k:n - k].mean(axis=0)
    out = TrimmedMean(beta=beta).aggregate(ups, [1.0] * n)["w"]
    assert out.shape == (3, 12_000)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("beta", [0.5, -0.1, 1, "0.2", True, None])
def test_bad_beta_names_the_plan_key(beta):
    with pytest.raises(ConfigError, match=r"plan key 'federation.aggregation.args.beta': .* is out of range") as exc:
        build_rule("trimmed_mean", {"beta": beta})
    assert "[0, 0.5)" in str(exc.value)


def test_unknown_argument_is_refused():
    with pytest.raises(ConfigError, match=r"'federation.aggregation.args.f': trimmed_mean has no argument 'f'"):
        build_rule("trimmed_mean", {"f": 1})


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 9), seed=st.integers(0, 2**16), data=st.data())
def test_permutation_invariant(n, seed, data):
    rs = np.random.RandomState(seed)
    ups = [{"w": rs.randn(7).astype(np.float32)} for _ in range(n)]
    order = data.draw(st.permutations(range(n)))
    a = TrimmedMean(beta=0.3).aggregate(ups, [1.0] * n)["w"]
    b = TrimmedMean(beta=0.3).aggregate([ups[i] for i in order], [1.0] * n)["w"]
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@settings(max_examples=40, deadline=None)
@given(honest=st.integers(1, 9), data=st.data(), seed=st.integers(0, 2**16))
def test_outliers_cannot_leave_the_honest_range(honest, data, seed):
    f = data.draw(st.integers(0, max(0, honest - 2)))  # n > 2f + 1, so that beta < 0.5 trims f
    n = honest + f
    beta = (f + 0.5) / n if f else 0.0  # int(beta * n) = f: exactly f trimmed from each end
    rs = np.random.RandomState(seed)
    good = [rs.randn(6).astype(np.float32) for _ in range(honest)]
    bad = [np.array(data.draw(st.lists(st.sampled_from([1e30, -1e30, 0.0, 9.0]), min_size=6, max_size=6)),
                    dtype=np.float32) for _ in range(f)]
    out = TrimmedMean(beta=beta).aggregate([{"w": x} for x in good + bad], [1.0] * n)["w"]
    lo, hi = np.min(good, axis=0), np.max(good, axis=0)
    slack = 1e-6 * (np.abs(lo) + np.abs(hi)) + 1e-12  # float32 rounding of the sum
    assert np.all(out >= lo - slack) and np.all(out <= hi + slack)
