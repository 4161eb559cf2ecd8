"""Bulyan (El Mhamdi, Guerraoui and Rouault, 2018, "The Hidden Vulnerability of Distributed Learning
in Byzantium", ICML 2018, arXiv:1802.07927).

Needs ``n >= 4f + 3`` updates. Step 1 selects ``theta = n - 2f`` updates with Krum; step 2 takes,
for each coordinate, the ``beta = theta - 2f`` selected values closest to their coordinate-wise
median and averages them. Unweighted, as in the paper and in Flower's ``Bulyan``.

Step 1 follows Flower's ``Bulyan`` (its default ``select_multikrum``): the ``theta`` updates with
the lowest Krum scores, each score computed once over all ``n`` updates with ``n - f - 2``
neighbours. The paper instead applies Krum recursively, removing each winner and rescoring the
rest; its last rounds score sets of only ``2f + 1`` updates, where Krum's ``n - f - 2`` neighbour
count falls below one and the rule is not defined, so that detail is left to Flower's choice.
Step 2 is the paper's (and Flower's): per coordinate, the median of the ``theta`` values (mean of
the two middle ones when ``theta`` is even), then the mean of the ``beta`` values with the smallest
``|x - median|``; these form a window of consecutive values in sorted order, found by comparing the
distances exactly (sums of two float32 values in float64). Flower compares the distances rounded to
float32 and lets ``numpy.argpartition`` break the ties that the rounding creates (about one
coordinate in 10^5 on random float32 data); there the two results may differ, ours keeping the value
that is truly closer (on an exact tie, the lower one).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from coordinator.aggregation import _stack
from coordinator.aggregation.krum import FIX, krum_select


def bulyan_kernel(theta: int, beta: int):
    network = _stack.sorting_network(theta)
    mid = theta // 2
    drop = theta - beta  # = 2f: how many of the sorted values fall outside the window

    def kernel(rows: list[np.ndarray], spare: np.ndarray, out: np.ndarray) -> None:
        rows = rows[:theta]
        _stack.apply_network(rows, spare, network)
        # the kept values are the window [a, a + beta) of the sorted values, where a counts the low
        # values farther from the median than the value beta places above them (a prefix of 0..2f-1).
        # |s_j - med| > |s_j+beta - med| <=> s_j + s_j+beta < 2 med, for s_j <= s_j+beta; the sums of two
        # float32 values are exact in float64, so the comparison is exact (no rounding ties).
        wide = np.float64 if out.dtype.itemsize < 8 else np.longdouble
        twice_med = np.add(rows[mid - 1] if theta % 2 == 0 else rows[mid], rows[mid], dtype=wide)
        pair = np.empty(out.shape, dtype=wide)
        a = np.zeros(out.shape, dtype=np.int16)
        for j in range(drop):
            np.add(rows[j], rows[j + beta], out=pair, dtype=wide)
            a += pair < twice_med
        out[...] = 0
        for i in range(theta):
            if i < drop or i >= beta:  # an edge value: kept where a <= i < a + beta
                mask = (a <= i) & (a > i - beta)
                np.add(out, rows[i], out=out, where=mask)
            else:
                out += rows[i]
        out /= beta

    return kernel


class Bulyan:
    """Rule object: ``aggregate(updates, weights)`` -> Bulyan aggregate (weights unused)."""

    name = "bulyan"

    def __init__(self, **args: object) -> None:
        args = dict(args)
        self.f = _stack.check_f(self.name, args)
        _stack.refuse_unknown(self.name, args)
        self.details: dict = {}

    def min_updates(self) -> int:
        return 4 * self.f + 3

    def aggregate(self, updates: list[Mapping[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
        keys = _stack.check_updates(f"{self.name} with f={self.f}", updates, weights, self.min_updates(),
                                    "n >= 4f+3", FIX)
        n = len(updates)
        theta = n - 2 * self.f
        beta = theta - 2 * self.f
        selected, scores = krum_select(updates, keys, self.f, theta)
        self.details = {"selected": selected, "theta": theta, "beta": beta, "scores": [float(s) for s in scores]}
        chosen = [updates[i] for i in selected]
        return _stack.coordinatewise(chosen, keys, bulyan_kernel(theta, beta))
