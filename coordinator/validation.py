"""Checks on every silo reply before it may count towards the aggregate.

A reply is accepted only if it carries a site id, the run id and round it answers, a positive
example count, and a delta in the plan's encoding (pipelines.compression: float32, float16, int8 or
top-k) with exactly the names, shapes and dtypes that encoding gives the global model, each array no
bigger than its slot allows (all checked on the header, before decoding); decompressed, every value
finite, and an L2 norm within the plan's bound (or clipped to it, as the plan says). Each failed check
is an :class:`UpdateRejected` with a short reason code and a human message; the caller audits it. The
arrays arrive packed in one safetensors blob (fedsilo.wire): nothing is ever unpickled.
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
MAX_METRICS = 64


class UpdateRejected(VerificationError):
    """A silo reply failed validation; ``code`` is a stable reason code for the audit log."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclass(frozen=True)
class Expectation:
    """What this round's replies must match: the run and round they answer, and the plan's norm bound."""

    run_id: str
    round: int
    norm_bound: float | None = None
    norm_action: str = "reject"  # or "clip"
    compression: str = "float32"  # the plan's update encoding (pipelines.compression)
    topk_fraction: float = 0.01


@dataclass(frozen=True)
class ValidUpdate:
    node_id: int
    site: str
    delta: dict[str, np.ndarray]
    num_examples: int
    metrics: dict[str, float]
    l2_norm: float = 0.0  # of the delta as received (before any clipping)
    clipped: bool = False
    wire_bytes: int = 0  # the payload's array bytes as received (compressed or not)
    wire_sha256: str = ""  # state_digest of the payload as received: matches the silo's update.sent record


def validate_reply(node_id: int, content, reference: Mapping[str, np.ndarray], expect: Expectation | None = None) -> ValidUpdate:
    """Validate one train reply's content against the global model ``reference`` and this round's ``expect``."""
    if P.ARRAYS not in content:
        raise UpdateRejected("missing-record", "reply lacks the identity, metrics or arrays record")
    site, n, metrics = check_identity_and_metrics(content, expect)
    delta, wire_bytes, wire_sha256 = _decode_update(content[P.ARRAYS], reference, expect or Expectation(run_id="", round=0))
    norm = global_l2_norm(delta)
    clipped = False
    if expect is not None and expect.norm_bound is not None and norm > expect.norm_bound:
        if expect.norm_action != "clip":
            raise UpdateRejected("norm-too-large", f"update L2 norm {norm:.4g} exceeds the plan's bound {expect.norm_bound:.4g}")
        scale = expect.norm_bound / norm
        delta = {k: (v * scale).astype(v.dtype) if np.issubdtype(v.dtype, np.floating) else v for k, v in delta.items()}
        clipped = True
    return ValidUpdate(node_id=node_id, site=site, delta=delta, num_examples=n, metrics=metrics, l2_norm=norm, clipped=clipped,
                       wire_bytes=wire_bytes, wire_sha256=wire_sha256)


def check_identity_and_metrics(content, expect: Expectation | None) -> tuple[str, int, dict[str, float]]:
    """(site, num-examples, numeric metrics) of a train reply whose identity answers this run and round."""
    if P.IDENTITY not in content or P.METRICS not in content:
        raise UpdateRejected("missing-record", "reply lacks the identity, metrics or arrays record")
    identity = content[P.IDENTITY]
    site = identity.get(P.SITE)
    if not isinstance(site, str) or not SITE_RE.match(site):
        raise UpdateRejected("bad-identity", "reply carries no valid site id")
    if expect is not None:
        run_id, round_ = identity.get(P.RUN_ID), identity.get(P.ROUND)
        if run_id != expect.run_id:
            raise UpdateRejected("wrong-run", "reply names another run (or none)")
        if isinstance(round_, bool) or not isinstance(round_, int) or round_ != expect.round:
            raise UpdateRejected("wrong-round", f"reply answers round {round_!r}, this is round {expect.round} (replayed or late)")
    if len(content[P.METRICS]) > MAX_METRICS:
        raise UpdateRejected("too-many-metrics", f"reply carries {len(content[P.METRICS])} metrics, at most {MAX_METRICS} are accepted")
    metrics = dict(content[P.METRICS])
    n = metrics.get(P.NUM_EXAMPLES)
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not 0 < n <= MAX_NUM_EXAMPLES or int(n) != n:
        raise UpdateRejected("bad-num-examples", f"num-examples must be a whole number in 1..{MAX_NUM_EXAMPLES}, got {n!r}")
    for key, value in metrics.items():
        if isinstance(value, (int, float)) and not math.isfinite(value):
            raise UpdateRejected("non-finite-metric", f"metric '{key}' is not finite")
    clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return site, int(n), clean


def _decode_update(record, reference: Mapping[str, np.ndarray], expect: Expectation) -> tuple[dict[str, np.ndarray], int, str]:
    """The payload's arrays checked against the plan's encoding (sizes before decoding), then decompressed to the
    dense delta, which must have exactly the global model's names, shapes and dtypes, every value finite."""
    from fedsilo.wire import HEADER_MAX, TooLarge, WireError, blob_of, describe, unpack
    from pipelines.compression import CompressionError, decompress, payload_layout
    from pipelines.serialization import state_digest

    layout = payload_layout(reference, expect.compression, expect.topk_fraction)
    limit = sum(slot.max_elements * np.dtype(slot.dtype).itemsize for slot in layout.values())
    try:  # the blob's size, then its header against the encoding, before any tensor is decoded
        blob = blob_of(record, max_bytes=8 + HEADER_MAX + limit)
        tensors = describe(blob)
    except WireError as exc:
        raise UpdateRejected("payload-too-large" if isinstance(exc, TooLarge) else "bad-payload", f"the update's packed tensors: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - whatever a hostile header provokes, one reply is rejected, the run goes on
        raise UpdateRejected("bad-payload", f"the update's packed tensors cannot be read ({type(exc).__name__})") from None
    names = set(tensors)
    if names != set(layout):
        raise UpdateRejected("wrong-names", f"tensor names differ from the plan's {expect.compression} encoding of the global model "
                             f"({len(names ^ set(layout))} mismatched)")
    for name, slot in layout.items():
        info = tensors[name]
        if info.elements > slot.max_elements:
            raise UpdateRejected("payload-too-large", f"tensor '{name}' holds {info.elements} values, its encoding allows at most {slot.max_elements}")
        shape_ok = info.shape == slot.shape if slot.shape is not None else len(info.shape) == 1
        if not shape_ok:
            raise UpdateRejected("wrong-shape", f"tensor '{name}' has shape {list(info.shape)}, expected "
                                 f"{list(slot.shape) if slot.shape is not None else 'a 1-D array'}")
        if info.dtype != np.dtype(slot.dtype).str:
            raise UpdateRejected("wrong-dtype", f"tensor '{name}' has dtype {np.dtype(info.dtype)}, expected {np.dtype(slot.dtype)}")
    try:
        payload = unpack(blob)  # canonical: exactly what fedsilo.wire.pack writes for these tensors
    except WireError as exc:
        raise UpdateRejected("bad-payload", f"the update's packed tensors: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - as above
        raise UpdateRejected("bad-payload", f"the update's packed tensors cannot be read ({type(exc).__name__})") from None
    try:
        delta = decompress(payload, reference, expect.compression, topk_fraction=expect.topk_fraction)
    except CompressionError as exc:
        raise UpdateRejected(exc.code.replace("_", "-"), exc.message) from None
    for name, arr in delta.items():
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise UpdateRejected("non-finite", f"tensor '{name}' holds NaN or Inf")
    return delta, int(sum(a.nbytes for a in payload.values())), state_digest(payload)


def global_l2_norm(delta: Mapping[str, np.ndarray]) -> float:
    """L2 norm of an update over all its floating-point tensors together, accumulated in float64."""
    total = 0.0
    for value in delta.values():
        if np.issubdtype(value.dtype, np.floating):
            flat = value.reshape(-1).astype(np.float64, copy=False)
            total += float(flat @ flat)
    return math.sqrt(total)
