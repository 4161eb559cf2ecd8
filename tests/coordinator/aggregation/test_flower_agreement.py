"""Our median, trimmed mean, Krum, Multi-Krum and Bulyan agree with Flower's strategies
(flwr.serverapp.strategy: FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan) to 1e-6 relative,
on random updates of several tensors fed to Flower as training replies (ArrayRecord + num-examples)."""

import numpy as np
import pytest

from coordinator.aggregation import build_rule
from coordinator.aggregation_bench import flower_aggregate, flower_replies, flower_strategy, max_relative_difference

CASES = [
    ("median", {}, 1), ("median", {}, 4), ("median", {}, 9),
    ("trimmed_mean", {"beta": 0.2}, 10), ("trimmed_mean", {"beta": 0.1}, 7), ("trimmed_mean", {"beta": 0.45}, 11),
    ("trimmed_mean", {"beta": 0.0}, 3),
    ("krum", {"f": 1}, 5), ("krum", {"f": 2}, 9), ("krum", {"f": 0}, 4),
    ("multikrum", {"f": 1}, 6), ("multikrum", {"f": 2, "m": 3}, 10), ("multikrum", {"f": 1, "m": 1}, 5),
    ("bulyan", {"f": 1}, 7), ("bulyan", {"f": 1}, 10), ("bulyan", {"f": 2}, 12),
]  # Flower's Bulyan costs about a second per call even on tiny inputs (its own gc.collect): few cases


def _updates(n: int, seed: int):
    rs = np.random.RandomState(seed)
    scales = rs.permutation(np.linspace(0.5, 2.0, n))  # well-separated Krum scores
    ups = [{"conv.weight": (rs.randn(4, 3, 3) * s).astype(np.float32),
            "conv.bias": (rs.randn(4) * s).astype(np.float32),
            "fc.weight": (rs.randn(5, 36) * s + 0.5).astype(np.float32)} for s in scales]
    return ups, list(rs.uniform(1.0, 100.0, n))


@pytest.mark.parametrize("name,args,n", CASES)
def test_agrees_with_flower(name, args, n):
    seed = n
    ups, weights = _updates(n, seed)
    ours = build_rule(name, args).aggregate(ups, weights)
    theirs = flower_aggregate(flower_strategy(name, args, n), flower_replies(ups, weights))
    assert set(theirs) == set(ours)
    for k in ours:
        assert ours[k].shape == theirs[k].shape and ours[k].dtype == ups[0][k].dtype
    assert max_relative_difference(ours, theirs) <= 1e-6


def test_the_comparison_sees_a_difference():
    ups, weights = _updates(7, 0)
    ours = build_rule("median").aggregate(ups, weights)
    theirs = flower_aggregate(flower_strategy("trimmed_mean", {"beta": 0.0}, 7), flower_replies(ups, weights))
    assert max_relative_difference(ours, theirs) > 1e-3
