"""Weighted FedAvg: hand-checkable numbers, dtype kept, empty input refused."""

import numpy as np
import pytest

from coordinator.aggregation import build_rule
from coordinator.aggregation.fedavg import weighted_mean
from fedsilo.errors import ConfigError


def test_weighted_by_examples():
    a = {"w": np.array([0.0, 2.0], dtype=np.float32), "b": np.array([1.0], dtype=np.float32)}
    b = {"w": np.array([4.0, 2.0], dtype=np.float32), "b": np.array([5.0], dtype=np.float32)}
    out = weighted_mean([(a, 1.0), (b, 3.0)])
    assert out["w"].tolist() == [3.0, 2.0] and out["b"].tolist() == [4.0]
    assert out["w"].dtype == np.float32


def test_permutation_invariant():
    rs = np.random.RandomState(0)
    ups = [({"w": rs.randn(5).astype(np.float32)}, float(i + 1)) for i in range(4)]
    np.testing.assert_allclose(weighted_mean(ups)["w"], weighted_mean(ups[::-1])["w"], rtol=1e-6)


def test_refuses_empty_and_non_positive_weights():
    with pytest.raises(ConfigError, match="no updates"):
        weighted_mean([])
    with pytest.raises(ConfigError, match="positive"):
        weighted_mean([({"w": np.zeros(1)}, 0.0)])


def test_registry_lists_valid_rules():
    assert build_rule("fedavg").name == "fedavg"
    with pytest.raises(ConfigError, match="unknown rule 'nope'.*use one of: fedavg, median, trimmed_mean, krum, multikrum, bulyan, "
                                          "geometric_median, centered_clipping, norm_bounded_mean"):
        build_rule("nope")
    with pytest.raises(ConfigError, match="takes no arguments"):
        build_rule("fedavg", {"beta": 0.1})
