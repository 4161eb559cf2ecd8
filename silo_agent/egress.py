"""The egress guard: the one outbound filter every reply of the silo passes.

Only these may leave: arrays with exactly the global model's names, shapes and dtypes; numeric,
finite metrics whose keys are on the allow-list; and the site id (a fixed identifier from
site.yaml). No strings from data, no headers, no paths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedsilo.errors import RefusalError

ALLOWED_METRICS = frozenset({
    "num-examples", "train-loss", "loss", "dice", "accuracy", "auc",
    "epsilon", "delta", "noise-multiplier", "sample-rate", "steps", "max-grad-norm", "seconds",
})


def check_arrays(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> None:
    """Refuse arrays whose names, shapes or dtypes differ from the global model's, or non-finite ones."""
    if set(arrays) != set(reference):
        extra = sorted(set(arrays) - set(reference))[:3]
        missing = sorted(set(reference) - set(arrays))[:3]
        raise RefusalError(f"egress blocked: update tensors differ from the global model (extra {extra}, missing {missing})")
    for name, arr in arrays.items():
        ref = reference[name]
        if arr.shape != ref.shape or arr.dtype != ref.dtype:
            raise RefusalError(f"egress blocked: tensor '{name}' is {arr.dtype}{list(arr.shape)}, the global model has {ref.dtype}{list(ref.shape)}")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise RefusalError(f"egress blocked: tensor '{name}' holds NaN or Inf")


def check_metrics(metrics: Mapping[str, object]) -> None:
    for key, value in metrics.items():
        if key not in ALLOWED_METRICS:
            raise RefusalError(f"egress blocked: metric '{key}' is not on the allow-list")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RefusalError(f"egress blocked: metric '{key}' is not a finite number")
