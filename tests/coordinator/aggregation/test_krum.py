"""Krum and Multi-Krum: hand-checked selections, the n >= 2f+3 check and its message, argument errors,
permutation invariance, and the honest range held against f far outliers."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.aggregation import build_rule
from coordinator.aggregation.krum import Krum, MultiKrum
from fedsilo.errors import ConfigError


def _ups(*values):
    return [{"w": np.array(v, dtype=np.float32)} for v in values]


def test_krum_picks_the_update_nearest_its_neighbours_by_hand():
    # n=5, f=1: each score sums the n-f-2 = 2 smallest squared distances to the others.
    ups = _ups([0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [50.0, -50.0])
    rule = Krum(f=1)
    out = rule.aggregate(ups, [1.0] * 5)
    # scores: u0: 1 + 4 = 5; u1: 1 + 5 = 6; u2: 4 + 5 = 9; u3: 10 + 13 = 23; u4: huge
    assert rule.details["selected"] == [0]
    np.testing.assert_allclose(rule.details["scores"][:4], [5.0, 6.0, 9.0, 23.0])
    assert out["w"].tolist() == [0.0, 0.0] and out["w"].dtype == np.float32
    assert out["w"] is not ups[0]["w"]  # a copy, not the silo's array


def test_multikrum_weights_the_selected_updates_by_examples():
    ups = _ups([0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [50.0, -50.0])
    rule = MultiKrum(f=1, m=2)
    out = rule.aggregate(ups, [1.0, 3.0, 1.0, 1.0, 1.0])
    assert rule.details["selected"] == [0, 1]
    np.testing.assert_allclose(out["w"], [0.75, 0.0])  # (1 * u0 + 3 * u1) / 4
    default = MultiKrum(f=1)  # m = n - f = 4: everything but the outlier
    out = default.aggregate(ups, [1.0] * 5)
    assert default.details["selected"] == [0, 1, 2, 3]
    np.testing.assert_allclose(out["w"], [1.0, 1.25])


def test_too_few_updates_says_what_to_change():
    ups = _ups(*[[float(i)] for i in range(5)])
    with pytest.raises(ConfigError) as exc:
        build_rule("krum", {"f": 2}).aggregate(ups, [1.0] * 5)
    assert str(exc.value) == ("krum with f=2 needs at least 7 updates (n >= 2f+3), got 5 "
                              "(fix: lower federation.aggregation.args.f or raise federation.min_silos)")
    with pytest.raises(ConfigError, match=r"multikrum with f=1 and m=5 needs at least 6 updates \(n >= m \+ f = 6\), got 5"):
        build_rule("multikrum", {"f": 1, "m": 5}).aggregate(ups, [1.0] * 5)
    assert Krum(f=2).min_updates() == 7 and MultiKrum(f=1).min_updates() == 5 and MultiKrum(f=0, m=5).min_updates() == 5
    assert build_rule("krum").f == 1  # default f


@pytest.mark.parametrize("args,key", [({"f": -1}, "f"), ({"f": 1.5}, "f"), ({"f": True}, "f"), ({"f": "2"}, "f"),
                                      ({"m": 0}, "m"), ({"m": 2.0}, "m"), ({"beta": 0.1}, "beta")])
def test_bad_arguments_name_the_plan_key(args, key):
    with pytest.raises(ConfigError, match=rf"plan key 'federation.aggregation.args.{key}'"):
        build_rule("multikrum", args)
    with pytest.raises(ConfigError, match=r"plan key 'federation.aggregation.args.m': krum has no argument"):
        build_rule("krum", {"m": 2})


def test_distances_survive_an_extreme_outlier_in_first_place():
    # update 0 is 1e30 away: the Gram pass is redone around a central update, the honest order is kept
    rs = np.random.RandomState(3)
    honest = [rs.randn(1000).astype(np.float32) * s for s in (1.0, 1.1, 1.2, 1.3, 3.0)]
    ups = [{"w": np.full(1000, 1e30, dtype=np.float32)}] + [{"w": h} for h in honest]
    rule = MultiKrum(f=1, m=4)
    rule.aggregate(ups, [1.0] * 6)
    assert sorted(rule.details["selected"]) == [1, 2, 3, 4]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(5, 10), seed=st.integers(0, 2**16), data=st.data())
def test_permutation_invariant(n, seed, data):
    rs = np.random.RandomState(seed)
    ups = [{"w": rs.randn(9).astype(np.float32)} for _ in range(n)]
    weights = list(rs.uniform(1, 10, n))
    order = data.draw(st.permutations(range(n)))
    for name in ("krum", "multikrum"):
        a = build_rule(name, {"f": 1}).aggregate(ups, weights)["w"]
        b = build_rule(name, {"f": 1}).aggregate([ups[i] for i in order], [weights[i] for i in order])["w"]
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@settings(max_examples=30, deadline=None)
@given(f=st.integers(0, 3), extra=st.integers(0, 3), seed=st.integers(0, 2**16), data=st.data())
def test_far_outliers_are_never_selected(f, extra, seed, data):
    honest = f + 3 + extra  # n = honest + f >= 2f + 3
    rs = np.random.RandomState(seed)
    good = [rs.randn(8).astype(np.float32) for _ in range(honest)]
    bad = [np.full(8, data.draw(st.sampled_from([1e30, -1e30, 1e4, -1e4])), dtype=np.float32) * rs.uniform(1, 2)
           for _ in range(f)]
    ups = [{"w": x} for x in bad + good]
    lo, hi = np.min(good, axis=0), np.max(good, axis=0)
    for rule in (Krum(f=f), MultiKrum(f=f)):
        out = rule.aggregate(ups, list(rs.uniform(1, 10, len(ups))))["w"]
        assert all(i >= f for i in rule.details["selected"])
        assert np.all(out >= lo - 1e-6) and np.all(out <= hi + 1e-6)
