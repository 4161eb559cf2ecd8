"""Centered clipping (Karimireddy, He, Jaggi 2021, "Learning from History for Byzantine Robust
Optimization", ICML; arXiv:2012.10333, eq. (CC)).

Starting from a center v (the previous round's aggregate; zero in the first round), L times:
    v <- v + sum_i alpha_i * (u_i - v) * min(1, tau / ||u_i - v||)
with alpha_i the silo weights normalised to sum 1 (the paper's 1/n when the weights are equal) and
||.|| the L2 norm over the concatenation of all tensors. Each silo moves the aggregate by at most
alpha_i * tau per iteration, however large its update.

The rule keeps the center across rounds; ``state_dict()`` / ``load_state_dict()`` carry it through a
checkpoint as plain arrays. All L iterations run on the Gram matrix of [updates, center] (one
streamed float64 pass), and one more pass materialises the result.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from coordinator.aggregation.geometric_median import check_args, check_updates, combine, distances, gram_matrix, number_arg
from fedsilo.errors import ConfigError


class CenteredClipping:
    """Rule "centered_clipping": args ``tau`` (clipping radius, > 0, required: it is in the units of the
    updates' L2 norm, so no default fits every model) and ``iters`` (L, >= 1, default 1).
    ``details`` after aggregate(): ``{"center": "zero" | "previous_aggregate", "iters": L,
    "clipped": [indices of updates clipped in any iteration]}``."""

    name = "centered_clipping"

    def __init__(self, **args: object) -> None:
        check_args(self.name, args, ("tau", "iters"))
        self.tau = number_arg(args, "tau", None, low=0.0, low_open=True)
        self.iters = int(number_arg(args, "iters", 1, low=1, integer=True))
        self.center: dict[str, np.ndarray] | None = None
        self.details: dict = {}

    def min_updates(self) -> int:
        return 1

    def state_dict(self) -> dict[str, np.ndarray]:
        """The center ({} while it is zero, before the first aggregate)."""
        return {} if self.center is None else {k: v.copy() for k, v in self.center.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.center = {k: np.array(v) for k, v in state.items()} or None

    def aggregate(self, updates: list[Mapping[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
        names, alpha = check_updates(updates, weights)
        n = len(updates)
        rows = list(updates)
        coef = np.zeros(n, dtype=np.float64)
        if self.center is not None:
            if set(self.center) != set(names) or any(self.center[k].shape != np.shape(updates[0][k]) for k in names):
                raise ConfigError("centered_clipping: the stored center does not match the model's tensors",
                                  fix="resume from a checkpoint of the same plan")
            rows.append(self.center)
            coef = np.append(coef, 1.0)
        gram, scale = gram_matrix(rows, names)
        tau = self.tau * scale
        clipped: set[int] = set()
        for _ in range(self.iters):
            dist = distances(gram, coef)[:n]
            factor = np.minimum(1.0, tau / np.maximum(dist, 1e-300))
            clipped.update(int(i) for i in np.flatnonzero(dist > tau))
            step = alpha * factor  # v + sum_i step_i (u_i - v)
            coef = coef * (1.0 - step.sum())
            coef[:n] += step
        self.details = {"center": "zero" if self.center is None else "previous_aggregate", "iters": self.iters,
                        "clipped": sorted(clipped)}
        out = combine(rows, names, coef)
        self.center = {k: v.copy() for k, v in out.items()}
        return out
