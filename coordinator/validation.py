"""Checks on every silo reply before it may count towards the aggregate.

A reply is accepted only if it carries a site id, a positive example count, and a delta with
exactly the global model's tensor names, shapes and dtypes, every value finite. Each failed
check is an :class:`UpdateRejected` with a short reason code and a human message; the caller
audits it. Arrays arrive as Flower ``Array`` objects deserialized with ``allow_pickle=False``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedsilo import protocol as P
from fedsilo.errors import VerificationError

SITE_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MAX_NUM_EXAMPLES = 10_000_000


class UpdateRejected(VerificationError):
    """A silo reply failed validation; ``code`` is a stable reason code for the audit log."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclass(frozen=True)
class ValidUpdate:
    node_id: int
    site: str
    delta: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]


def validate_reply(node_id: int, content, reference: Mapping[str, np.ndarray]) -> ValidUpdate:
    """Validate one train reply's content against the global model ``reference``."""
    if P.IDENTITY not in content or P.METRICS not in content or P.ARRAYS not in content:
        raise UpdateRejected("missing-record", "reply lacks the identity, metrics or arrays record")
    site = content[P.IDENTITY].get(P.SITE)
    if not isinstance(site, str) or not SITE_RE.match(site):
        raise UpdateRejected("bad-identity", "reply carries no valid site id")
    metrics = dict(content[P.METRICS])
    n = metrics.get(P.NUM_EXAMPLES)
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not 0 < n <= MAX_NUM_EXAMPLES or int(n) != n:
        raise UpdateRejected("bad-num-examples", f"num-examples must be a whole number in 1..{MAX_NUM_EXAMPLES}, got {n!r}")
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not math.isfinite(value):
            raise UpdateRejected("non-finite-metric", f"metric '{key}' is not finite")
    record = content[P.ARRAYS]
    names = set(record.keys())
    if names != set(reference):
        raise UpdateRejected("wrong-names", f"tensor names differ from the global model ({len(names ^ set(reference))} mismatched)")
    delta = {}
    for name, ref in reference.items():
        arr = record[name].numpy()
        if arr.shape != ref.shape:
            raise UpdateRejected("wrong-shape", f"tensor '{name}' has shape {list(arr.shape)}, expected {list(ref.shape)}")
        if arr.dtype != ref.dtype:
            raise UpdateRejected("wrong-dtype", f"tensor '{name}' has dtype {arr.dtype}, expected {ref.dtype}")
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise UpdateRejected("non-finite", f"tensor '{name}' holds NaN or Inf")
        delta[name] = arr
    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return ValidUpdate(node_id=node_id, site=site, delta=delta, num_examples=int(n), metrics=clean)
