"""Coordinate-wise median of updates (Yin, Chen, Ramchandran and Bartlett, 2018, "Byzantine-Robust
Distributed Learning: Towards Optimal Statistical Rates", ICML 2018, arXiv:1803.01498).

Each coordinate of the result is the median of that coordinate over the ``n`` updates; for even
``n`` the mean of the two middle values (as ``numpy.median`` and Flower's ``FedMedian``).
Unweighted: the silos' example counts are ignored, as in the paper and in Flower. With ``f < n/2``
Byzantine updates every coordinate stays within the honest updates' range.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from coordinator.aggregation import _stack


def median_kernel(n: int):
    mid = n // 2
    outputs = (mid,) if n % 2 else (mid - 1, mid)
    network = _stack.selection_network(n, outputs)

    def kernel(rows: list[np.ndarray], spare: np.ndarray, out: np.ndarray) -> None:
        _stack.apply_network(rows, spare, network)
        if n % 2:
            out[...] = rows[mid]
        else:
            np.add(rows[mid - 1], rows[mid], out=out)
            out *= 0.5

    return kernel


class Median:
    """Rule object: ``aggregate(updates, weights)`` -> coordinate-wise median (weights unused)."""

    name = "median"

    def __init__(self, **args: object) -> None:
        _stack.refuse_unknown(self.name, dict(args))
        self.details: dict = {}

    def min_updates(self) -> int:
        return 1

    def aggregate(self, updates: list[Mapping[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
        keys = _stack.check_updates(self.name, updates, weights, self.min_updates(), "n >= 1",
                                    "check that at least one silo replied with a valid update")
        self.details = {}
        return _stack.coordinatewise(updates, keys, median_kernel(len(updates)))
