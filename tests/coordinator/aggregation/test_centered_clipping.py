"""Centered clipping: hand-checked rounds, the center carried across rounds and through a
checkpoint, argument errors, and the bounded influence of any one silo."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.aggregation.centered_clipping import CenteredClipping
from coordinator.aggregation.fedavg import weighted_mean
from fedsilo.errors import ConfigError


def _u(*xs, dtype=np.float64):
    return {"w": np.array(xs, dtype=dtype)}


def test_zero_center_and_large_tau_is_the_weighted_mean():
    ups = [{"a": np.array([1.0, 2.0], dtype=np.float32), "b": np.array([[3.0]], dtype=np.float32)},
           {"a": np.array([-5.0, 0.5], dtype=np.float32), "b": np.array([[1.0]], dtype=np.float32)}]
    out = CenteredClipping(tau=1e6).aggregate(ups, [1.0, 3.0])
    ref = weighted_mean(zip(ups, [1.0, 3.0]))
    assert out["a"].dtype == np.float32 and out["b"].shape == (1, 1)
    np.testing.assert_allclose(out["a"], ref["a"], rtol=1e-6)
    np.testing.assert_allclose(out["b"], ref["b"], rtol=1e-6)


def test_rounds_by_hand():
    rule = CenteredClipping(tau=1.0)
    assert rule.state_dict() == {}
    # Round 1, center 0: (3, 4) has norm 5 > 1 -> clipped to (0.6, 0.8).
    np.testing.assert_allclose(rule.aggregate([_u(3.0, 4.0)], [1.0])["w"], [0.6, 0.8])
    assert rule.details == {"center": "zero", "iters": 1, "clipped": [0]}
    # Round 2, center (0.6, 0.8): (0.6, 2.8) is at distance 2 -> the center moves 1 toward it.
    np.testing.assert_allclose(rule.aggregate([_u(0.6, 2.8)], [1.0])["w"], [0.6, 1.8])
    assert rule.details["center"] == "previous_aggregate"
    # Round 3: within tau of the center (0.6, 1.8): taken as is.
    np.testing.assert_allclose(rule.aggregate([_u(0.6, 2.0)], [1.0])["w"], [0.6, 2.0])
    assert rule.details["clipped"] == []


def test_iterations_and_weights_by_hand():
    # L = 2 from 0 toward (3, 4): (0.6, 0.8), then a quarter of the remaining (2.4, 3.2): (1.2, 1.6).
    np.testing.assert_allclose(CenteredClipping(tau=1.0, iters=2).aggregate([_u(3.0, 4.0)], [5.0])["w"], [1.2, 1.6])
    # Two silos, equal weight: (10, 0) clipped to (1, 0), (0, 0) kept -> (0.5, 0).
    rule = CenteredClipping(tau=1.0)
    np.testing.assert_allclose(rule.aggregate([_u(10.0, 0.0), _u(0.0, 0.0)], [2.0, 2.0])["w"], [0.5, 0.0])
    assert rule.details["clipped"] == [0]


def test_norm_is_over_all_tensors_together():
    out = CenteredClipping(tau=2.5).aggregate([{"a": np.array([3.0]), "b": np.array([4.0])}], [1.0])
    np.testing.assert_allclose([out["a"][0], out["b"][0]], [1.5, 2.0])


def test_state_dict_round_trip_reproduces_the_next_round():
    rs = np.random.RandomState(1)
    rounds = [[{"w": rs.randn(6).astype(np.float32), "b": rs.randn(2, 2).astype(np.float32)} for _ in range(4)] for _ in range(3)]
    ws = [1.0, 2.0, 3.0, 4.0]
    a = CenteredClipping(tau=0.7, iters=2)
    for ups in rounds[:2]:
        a.aggregate(ups, ws)
    state = a.state_dict()
    assert set(state) == {"w", "b"} and all(isinstance(v, np.ndarray) for v in state.values())
    b = CenteredClipping(tau=0.7, iters=2)
    b.load_state_dict(state)
    out_a, out_b = a.aggregate(rounds[2], ws), b.aggregate(rounds[2], ws)
    for k in out_a:
        np.testing.assert_array_equal(out_a[k], out_b[k])
    b.load_state_dict({})
    assert b.state_dict() == {}


def test_center_of_another_model_is_refused():
    rule = CenteredClipping(tau=1.0)
    rule.load_state_dict({"other": np.zeros(2)})
    with pytest.raises(ConfigError, match="stored center does not match"):
        rule.aggregate([_u(1.0, 2.0)], [1.0])


@pytest.mark.parametrize("args, key, what", [({}, "tau", "required"), ({"tau": 0}, "tau", "out of range"),
                                             ({"tau": -2.0}, "tau", "out of range"), ({"tau": 1, "iters": 0}, "iters", "out of range"),
                                             ({"tau": 1, "iters": 1.5}, "iters", "whole number"), ({"tau": "1"}, "tau", "not a number"),
                                             ({"tau": 1, "center": "zero"}, "center", "unknown argument")])
def test_bad_args_name_the_plan_key(args, key, what):
    with pytest.raises(ConfigError, match=rf"federation\.aggregation\.args\.{key}'.*{what}"):
        CenteredClipping(**args)


vec = st.lists(st.floats(-10, 10, allow_nan=False), min_size=3, max_size=3)
big = st.lists(st.one_of(st.floats(-1e30, 1e30, allow_nan=False), st.sampled_from([1e30, -1e30])), min_size=3, max_size=3)


@settings(max_examples=60, deadline=None)
@given(st.lists(vec, min_size=1, max_size=6), big, st.floats(0.1, 5), st.floats(0.01, 3), st.integers(1, 3), vec,
       st.randoms(use_true_random=False))
def test_one_silo_moves_the_aggregate_by_at_most_twice_its_share_of_tau(honest, bad, tau, bad_w, iters, center, rnd):
    """Whatever one silo sends, the aggregate lies within 2 * L * alpha * tau of where a benign value
    (here: the center itself) would put it, and within L * tau of the center. Why: one CC iteration
    is F(v) = sum_i alpha_i h_i(v), h_i(v) = v + clip_tau(u_i - v) = u_i - (I - P)(u_i - v) with P
    the projection on the tau-ball, so F is 1-Lipschitz in v; changing one u_i changes F by at most
    alpha * 2 tau; by induction L iterations differ by at most 2 L alpha tau. Also shuffles the order."""
    ws = [1.0] * len(honest) + [bad_w]
    alpha = bad_w / sum(ws)
    results = []
    for outlier in (bad, center):
        rows = [np.array(h) for h in honest] + [np.array(outlier)]
        idx = list(range(len(rows)))
        rnd.shuffle(idx)
        rule = CenteredClipping(tau=tau, iters=iters)
        rule.load_state_dict({"w": np.array(center)})
        out = rule.aggregate([{"w": rows[i]} for i in idx], [ws[i] for i in idx])["w"]
        assert np.linalg.norm(out - np.array(center)) <= iters * tau * (1 + 1e-9) + 1e-9
        results.append(out)
    bound = 2 * iters * alpha * tau
    assert np.linalg.norm(results[0] - results[1]) <= bound * (1 + 1e-9) + 1e-9
