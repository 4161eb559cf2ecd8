"""Bulyan: hand-checked numbers, agreement with a plain reference implementation, the n >= 4f+3 check and
its message, argument errors, permutation invariance, and the honest range held against f far outliers."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.aggregation import build_rule
from coordinator.aggregation.bulyan import Bulyan
from fedsilo.errors import ConfigError


def _reference(values: np.ndarray, f: int) -> np.ndarray:
    """Bulyan on an (n, d) float64 matrix, written plainly: Krum scores, theta lowest, beta closest to the median."""
    n = len(values)
    dist = ((values[:, None, :] - values[None, :, :]) ** 2).sum(axis=2)
    scores = [np.sort(np.delete(dist[i], i))[: n - f - 2].sum() for i in range(n)]
    theta, beta = n - 2 * f, n - 4 * f
    chosen = values[np.argsort(scores, kind="stable")[:theta]]
    out = []
    for col in chosen.T:
        med = np.median(col)
        out.append(np.mean(sorted(col, key=lambda x: abs(x - med))[:beta]))
    return np.array(out)


def test_by_hand():
    # n=7, f=1: theta=5 by Krum (the outliers score ~1e6), beta=3 closest to the median 2: 1, 2 and 0 -> 1
    ups = [{"w": np.array([v], dtype=np.float32)} for v in (0.0, 1.0, 2.0, 5.0, 7.0, 1000.0, -1000.0)]
    rule = Bulyan(f=1)
    out = rule.aggregate(ups, [1.0] * 7)
    assert out["w"].tolist() == [1.0] and out["w"].dtype == np.float32
    assert sorted(rule.details["selected"]) == [0, 1, 2, 3, 4]
    assert rule.details["theta"] == 5 and rule.details["beta"] == 3


@pytest.mark.parametrize("n,f", [(3, 0), (7, 1), (8, 1), (11, 2), (12, 2), (15, 3)])
def test_matches_a_plain_reference(n, f):
    rs = np.random.RandomState(n)
    values = (rs.randint(-2**20, 2**20, size=(n, 300)) / 2**16).astype(np.float32)
    values *= np.linspace(0.5, 2.0, n, dtype=np.float32)[:, None]
    ups = [{"w": v.reshape(3, 100).copy()} for v in values]
    out = Bulyan(f=f).aggregate(ups, [1.0] * n)["w"]
    assert out.shape == (3, 100)
    np.testing.assert_allclose(out.reshape(-1), _reference(values.astype(np.float64), f), rtol=1e-6, atol=1e-6)


def test_too_few_updates_and_bad_arguments():
    ups = [{"w": np.array([float(i)])} for i in range(10)]
    with pytest.raises(ConfigError) as exc:
        build_rule("bulyan", {"f": 2}).aggregate(ups, [1.0] * 10)
    assert str(exc.value) == ("bulyan with f=2 needs at least 11 updates (n >= 4f+3), got 10 "
                              "(fix: lower federation.aggregation.args.f or raise federation.min_silos)")
    assert Bulyan().min_updates() == 7 and Bulyan(f=0).min_updates() == 3
    with pytest.raises(ConfigError, match=r"plan key 'federation.aggregation.args.f': -1 is not a whole number"):
        build_rule("bulyan", {"f": -1})
    with pytest.raises(ConfigError, match=r"plan key 'federation.aggregation.args.m': bulyan has no argument 'm'"):
        build_rule("bulyan", {"f": 1, "m": 3})


@settings(max_examples=25, deadline=None)
@given(n=st.integers(7, 10), seed=st.integers(0, 2**16), data=st.data())
def test_permutation_invariant(n, seed, data):
    rs = np.random.RandomState(seed)
    ups = [{"w": rs.randn(9).astype(np.float32) * (1 + i / n)} for i in range(n)]
    order = data.draw(st.permutations(range(n)))
    a = Bulyan(f=1).aggregate(ups, [1.0] * n)["w"]
    b = Bulyan(f=1).aggregate([ups[i] for i in order], [1.0] * n)["w"]
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@settings(max_examples=25, deadline=None)
@given(f=st.integers(0, 2), extra=st.integers(0, 2), seed=st.integers(0, 2**16), data=st.data())
def test_far_outliers_stay_out(f, extra, seed, data):
    honest = 3 * f + 3 + extra  # n = honest + f >= 4f + 3
    rs = np.random.RandomState(seed)
    good = [rs.randn(8).astype(np.float32) for _ in range(honest)]
    bad = [np.full(8, data.draw(st.sampled_from([1e30, -1e30, 1e4, -1e4])), dtype=np.float32) for _ in range(f)]
    ups = [{"w": x} for x in good + bad]
    out = Bulyan(f=f).aggregate(ups, [1.0] * len(ups))["w"]
    lo, hi = np.min(good, axis=0), np.max(good, axis=0)
    assert np.all(out >= lo - 1e-6) and np.all(out <= hi + 1e-6)
