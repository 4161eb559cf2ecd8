"""Weighted federated averaging of updates (McMahan et al. 2017, "Communication-Efficient
Learning of Deep Networks from Decentralized Data", arXiv:1602.05629, Algorithm 1).

The coordinator averages silo deltas weighted by their number of training examples. The sum is
streamed: one float64 accumulator per tensor, so memory is O(d) whatever the number of silos.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from fedsilo.errors import ConfigError


def weighted_mean(updates: Iterable[tuple[Mapping[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """Sum_i w_i * u_i / Sum_i w_i over (update, weight) pairs, in each tensor's own dtype.

    >>> a = {"w": np.array([0.0, 2.0], dtype=np.float32)}
    >>> b = {"w": np.array([4.0, 2.0], dtype=np.float32)}
    >>> weighted_mean([(a, 1), (b, 3)])["w"].tolist()
    [3.0, 2.0]
    """
    acc: dict[str, np.ndarray] = {}
    dtypes: dict[str, np.dtype] = {}
    total = 0.0
    for update, weight in updates:
        if not weight > 0:
            raise ConfigError(f"update weight must be positive, got {weight}", fix="send num-examples > 0")
        if not acc:
            acc = {k: np.zeros(v.shape, dtype=np.float64) for k, v in update.items()}
            dtypes = {k: v.dtype for k, v in update.items()}
        for name, value in update.items():
            acc[name] += weight * value
        total += weight
    if not acc:
        raise ConfigError("no updates to aggregate", fix="check that at least one silo replied with a valid update")
    return {k: (v / total).astype(dtypes[k]) for k, v in acc.items()}


class FedAvg:
    """Rule object: ``aggregate(updates, weights)`` -> averaged delta."""

    name = "fedavg"

    def __init__(self, **args: object) -> None:
        if args:
            raise ConfigError(f"plan key 'federation.aggregation.args': fedavg takes no arguments, got {sorted(args)}", fix="remove the args")

    def aggregate(self, updates: list[Mapping[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
        return weighted_mean(zip(updates, weights))
