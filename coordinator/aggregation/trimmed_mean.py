"""Coordinate-wise trimmed mean of updates (Yin, Chen, Ramchandran and Bartlett, 2018, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates", ICML 2018, arXiv:1803.01498).

For each coordinate, sort the ``n`` values, drop ``k = floor(beta * n)`` from each end and average
the rest. ``beta`` (plan arg, default 0.2, ``0 <= beta < 0.5``) is the fraction trimmed from EACH
end, as in Flower's ``FedTrimmedAvg`` and ``scipy.stats.trim_mean``. Unweighted: the silos'
example counts are ignored, as in the paper and in Flower. With ``k >= f`` (``beta >= f/n``) each
coordinate stays within the honest updates' range whatever the ``f`` Byzantine updates send.
The sum of the kept values is taken in the work dtype (float32 for float32 tensors), as
``numpy.mean`` does in Flower.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from coordinator.aggregation import _stack
from fedsilo.errors import ConfigError


def trimmed_kernel(n: int, k: int):
    keep = n - 2 * k
    network = _stack.selection_network(n, tuple(range(k, n - k))) if k else ()

    def kernel(rows: list[np.ndarray], spare: np.ndarray, out: np.ndarray) -> None:
        _stack.apply_network(rows, spare, network)
        out[...] = rows[k]
        for r in rows[k + 1 : n - k]:
            out += r
        out /= keep

    return kernel


class TrimmedMean:
    """Rule object: ``aggregate(updates, weights)`` -> coordinate-wise trimmed mean (weights unused)."""

    name = "trimmed_mean"

    def __init__(self, **args: object) -> None:
        args = dict(args)
        beta = args.pop("beta", 0.2)
        _stack.refuse_unknown(self.name, args)
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta < 0.5:
            raise ConfigError(f"plan key 'federation.aggregation.args.beta': {beta!r} is out of range",
                              fix="use a value in [0, 0.5): the fraction trimmed from each end")
        self.beta = float(beta)
        self.details: dict = {}

    def min_updates(self) -> int:
        return 1

    def trimmed(self, n: int) -> int:
        """How many values are dropped from each end for ``n`` updates (as Flower: int(beta * n))."""
        return int(self.beta * n)

    def aggregate(self, updates: list[Mapping[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
        keys = _stack.check_updates(self.name, updates, weights, self.min_updates(), "n >= 1",
                                    "check that at least one silo replied with a valid update")
        n = len(updates)
        k = self.trimmed(n)
        self.details = {"trimmed_each_end": k}
        return _stack.coordinatewise(updates, keys, trimmed_kernel(n, k))
