"""Norm-bounded mean (norm thresholding of updates; Sun, Kairouz, Suresh, McMahan 2019, "Can You
Really Backdoor Federated Learning?", arXiv:1911.07963, Section 3).

Each update is scaled to L2 norm at most ``max_norm`` (u_i * min(1, max_norm / ||u_i||), the norm
over the concatenation of all tensors), then the clipped updates are averaged with the silo
weights, as FedAvg does. One streamed float64 pass for the norms (the diagonal of the Gram matrix:
for a few silos BLAS makes the whole matrix as cheap as its diagonal), one for the mean.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from coordinator.aggregation.geometric_median import check_args, check_updates, combine, gram_matrix, number_arg


class NormBoundedMean:
    """Rule "norm_bounded_mean": arg ``max_norm`` (> 0, required). ``details`` after aggregate():
    ``{"clipped": [indices of updates whose norm exceeded max_norm]}``."""

    name = "norm_bounded_mean"

    def __init__(self, **args: object) -> None:
        check_args(self.name, args, ("max_norm",))
        self.max_norm = number_arg(args, "max_norm", None, low=0.0, low_open=True)
        self.details: dict = {}

    def min_updates(self) -> int:
        return 1

    def aggregate(self, updates: list[Mapping[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
        names, alpha = check_updates(updates, weights)
        gram, scale = gram_matrix(updates, names)  # squared norms on the diagonal (rescaled if they overflow)
        norms = np.sqrt(np.diag(gram)) / scale
        over = norms > self.max_norm
        factor = np.ones_like(norms)
        factor[over] = self.max_norm / norms[over]
        self.details = {"clipped": [int(i) for i in np.flatnonzero(over)]}
        return combine(updates, names, alpha * factor)
