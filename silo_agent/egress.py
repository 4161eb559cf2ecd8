"""The egress guard: the one outbound filter every reply of the silo passes.

Only these may leave: arrays (packed in one safetensors blob, fedsilo.wire, with no metadata) with exactly
the global model's names, shapes and dtypes; numeric,
finite metrics whose keys are on the allow-list; and the site id (a fixed identifier from
site.yaml). No strings from data, no headers, no paths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedsilo.errors import RefusalError
from fedsilo.protocol import RECORDS_FROM_SILO

#: The figures of a silo's personalized model (``training.personalize``) at the final evaluation, by the metric's name.
PERSONALIZED_PREFIX = "personalized-"
ALLOWED_METRICS = frozenset({
    "num-examples", "train-loss", "loss", "dice", "accuracy", "auc",
    "epsilon", "delta", "noise-multiplier", "sample-rate", "steps", "max-grad-norm", "seconds",
    *(PERSONALIZED_PREFIX + m for m in ("loss", "dice", "accuracy", "auc")),
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


#: The records a reply may carry (fedsilo.protocol.RECORDS_FROM_SILO, the same names a coordinator opens), checked below.
REPLY_RECORDS = frozenset(RECORDS_FROM_SILO)
POLICY_METRICS = {"loss": "loss", "train-loss": "loss", "dice": "dice", "accuracy": "accuracy", "auc": "auc",
                  **{PERSONALIZED_PREFIX + m: m for m in ("loss", "dice", "accuracy", "auc")}}


def check_reply(content, *, site_id: str, run_id: str, round_: int, allowed_metrics: tuple[str, ...],
                layout: Mapping[str, object] | None = None) -> None:
    """The last check on a whole reply before it leaves: which records, which keys, which strings.

    Records: only arrays (exactly the names, dtypes and shapes of the plan's update encoding for the global
    model: ``layout`` is :func:`pipelines.compression.payload_layout`), metrics and evaluation (allow-listed,
    finite, and among the site policy's ``allowed_metrics``), identity (exactly site, run id and round, equal to this site and the
    message answered) and witness (a cosigned checkpoint, checked by witnessing.check_cosigned).
    """
    from fedsilo import protocol as P

    names = set(content.keys())
    if not names <= REPLY_RECORDS:
        raise RefusalError(f"egress blocked: reply carries unexpected records {sorted(names - REPLY_RECORDS)}")
    if P.ARRAYS in content:
        if layout is None:
            raise RefusalError("egress blocked: arrays in a reply that sends none")
        from fedsilo.wire import WireError, blob_of, describe, unpack

        try:  # the packed blob (fedsilo.wire): names, dtypes, shapes, offsets that tile the data, no metadata, and
            blob = blob_of(content[P.ARRAYS])  # byte for byte the canonical encoding of its tensors (nothing
            tensors = describe(blob)  # rides in the header's whitespace, key order or escapes)
            unpack(blob, canonical=True)
        except WireError as exc:
            raise RefusalError(f"egress blocked: {exc}") from None
        if set(tensors) != set(layout):
            raise RefusalError("egress blocked: reply tensors differ from the global model")
        for name, slot in layout.items():
            info, dtype = tensors[name], np.dtype(slot.dtype)
            shape = info.shape
            fits = shape == slot.shape if slot.shape is not None else len(shape) == 1 and shape[0] <= slot.max_elements
            if not fits or info.dtype != dtype.str:
                raise RefusalError(f"egress blocked: tensor '{name}' is {np.dtype(info.dtype)}{list(shape)}, the update encoding needs {dtype}"
                                   f"{list(slot.shape) if slot.shape is not None else '[<=%d]' % slot.max_elements}")
    for name in (P.METRICS, P.EVALUATION):  # a train reply's own metrics, and the evaluation it may carry
        if name not in content:
            continue
        metrics = dict(content[name])
        check_metrics(metrics)
        refused = sorted(k for k in metrics if k in POLICY_METRICS and POLICY_METRICS[k] not in allowed_metrics)
        if refused:
            raise RefusalError(f"egress blocked: the site policy does not let {', '.join(refused)} leave (allowed_metrics)")
    identity = dict(content[P.IDENTITY]) if P.IDENTITY in content else {}
    expected = {P.SITE: site_id, P.RUN_ID: run_id, P.ROUND: round_}
    if any(k not in expected for k in identity) or identity.get(P.SITE) != site_id or any(identity[k] != v for k, v in expected.items() if k in identity):
        raise RefusalError("egress blocked: the identity record holds something other than this site, run and round")
    if P.WITNESS in content and set(content[P.WITNESS].keys()) != {P.COSIGNED}:
        raise RefusalError("egress blocked: the witness record holds something other than the cosigned checkpoint")
