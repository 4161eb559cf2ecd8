"""Krum and Multi-Krum (Blanchard, El Mhamdi, Guerraoui and Stainer, 2017, "Machine Learning with
Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017, arXiv:1703.02757).

Each update's score is the sum of its squared L2 distances to its ``n - f - 2`` nearest other
updates. Krum returns the update with the lowest score (``n >= 2f + 3``). Multi-Krum averages the
``m`` lowest-scoring updates (default ``m = n - f``); like Flower's ``MultiKrum`` (and unlike the
paper's plain average) the average is weighted by the silos' example counts. Krum's output is the
selected update itself, so its weight does not matter.

Distances come from one Gram matrix over the flattened updates (see ``_stack.squared_distances``),
accumulated in float64. Ties in the scores are broken by the lower update index.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from coordinator.aggregation import _stack
from coordinator.aggregation.fedavg import weighted_mean
from fedsilo.errors import ConfigError

FIX = "lower federation.aggregation.args.f or raise federation.min_silos"


def krum_select(updates: list[Mapping[str, np.ndarray]], keys: list[str], f: int, m: int) -> tuple[list[int], np.ndarray]:
    """Indices of the ``m`` lowest Krum scores (best first) and all scores."""
    scores = _stack.krum_scores(_stack.squared_distances(updates, keys), f)
    order = np.argsort(scores, kind="stable")
    return [int(i) for i in order[:m]], scores


class MultiKrum:
    """Rule object: ``aggregate(updates, weights)`` -> weighted mean of the ``m`` best-scored updates."""

    name = "multikrum"

    def __init__(self, **args: object) -> None:
        args = dict(args)
        self.f = _stack.check_f(self.name, args)
        m = args.pop("m", None) if self.name == "multikrum" else 1
        _stack.refuse_unknown(self.name, args)
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ConfigError(f"plan key 'federation.aggregation.args.m': {m!r} is not a whole number >= 1",
                              fix="set m to how many of the best-scored updates to average, at most n - f")
        self.m = m
        self.details: dict = {}

    def min_updates(self) -> int:
        need = 2 * self.f + 3
        if self.m is not None:
            need = max(need, self.m + self.f)
        return need

    def _need_text(self) -> str:
        if self.m is not None and self.m + self.f > 2 * self.f + 3:
            return f"n >= m + f = {self.m + self.f}"
        return "n >= 2f+3"

    def aggregate(self, updates: list[Mapping[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
        what = f"{self.name} with f={self.f}" + (f" and m={self.m}" if self.name == "multikrum" and self.m else "")
        fix = FIX if self.name == "krum" or self.m is None else FIX + ", or lower federation.aggregation.args.m"
        keys = _stack.check_updates(what, updates, weights, self.min_updates(), self._need_text(), fix)
        n = len(updates)
        m = self.m if self.m is not None else n - self.f
        selected, scores = krum_select(updates, keys, self.f, m)
        self.details = {"selected": selected, "scores": [float(s) for s in scores]}
        if m == 1:
            chosen = updates[selected[0]]
            return {k: np.array(chosen[k], copy=True) for k in keys}
        return weighted_mean([(updates[i], weights[i]) for i in selected])


class Krum(MultiKrum):
    """Rule object: ``aggregate(updates, weights)`` -> the single best-scored update (weights unused)."""

    name = "krum"
