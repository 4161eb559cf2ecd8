"""Update compression: how a silo's model update travels to the coordinator, and how it is decoded.

Four modes (:data:`MODES`), chosen per plan (``federation.compression``):

- ``float32``: the update itself (the default; no loss).
- ``float16``: IEEE half precision, half the bytes. Values beyond float16's finite range (|x| > 65504) are
  clipped to it rather than refused (a DP-clipped update never comes near it); below it the relative error is
  at most 2**-11 for |x| >= 2**-14 and the absolute error at most 2**-25 for smaller (subnormal) values.
- ``int8``: per-tensor affine quantization (Jacob et al. 2018, "Quantization and Training of Neural Networks
  for Efficient Integer-Arithmetic-Only Inference", arXiv:1712.05877, section 2.1: ``r = S (q - Z)``), with the
  tensor's own range: ``offset = min``, ``scale = (max - min) / 255``, ``x ~= (q + 128) * scale + offset``,
  ``q`` in int8. A quarter of the bytes plus 8 bytes per tensor. A constant tensor has scale 0.
  Rounding is **unbiased stochastic rounding** (``q = floor(t + u)``, ``u ~ U[0, 1)``, so ``E[decoded] = x``,
  error below one ``scale``), as in QSGD (Alistarh et al. 2017, arXiv:1610.02132) and Gupta et al. 2015
  (arXiv:1502.02551), rather than round-to-nearest (error at most ``scale / 2``). Why: the coordinator
  *averages* decoded updates over silos and the global model *sums* them over rounds. With this affine grid,
  0 is generally not a grid point (Jacob et al. nudge the zero point for that reason), and most entries of an
  update sit near 0, so round-to-nearest moves them all to the same grid point: a per-tensor bias of up to
  ``scale / 2`` that neither averaging nor summing removes. Stochastic rounding's error has mean zero, so the
  average of n silos' errors shrinks like ``1 / sqrt(n)`` and nothing accumulates across rounds; its variance
  (at most ``scale**2 / 4`` per entry) is the price.
- ``topk``: one global top-k by magnitude over all floating entries of the model,
  ``k = max(1, ceil(topk_fraction * total))`` (Aji & Heafield 2017, "Sparse Communication for Distributed
  Gradient Descent", arXiv:1704.05021), sent per tensor as flat indices (int32, strictly increasing) and
  values (float32), 8 bytes per kept entry. With **error feedback** kept at the silo (Stich, Cordonnier &
  Jaggi 2018, "Sparsified SGD with Memory", arXiv:1809.07599; Karimireddy et al. 2019, "Error Feedback Fixes
  SignSGD and other Gradient Compression Schemes", arXiv:1901.09847): the silo compresses
  ``a = delta + residual``, sends ``top_k(a)`` and keeps ``residual = a - top_k(a)``, so nothing is dropped,
  only delayed; :func:`compress` takes and returns the residual, the caller persists it (at the site: it is
  derived from private data and never leaves).

Only floating-point tensors are compressed; any other tensor of the model travels unchanged under its own name.
Payload names: float32/float16: the tensor names; int8: ``NAME/q``, ``NAME/scale``, ``NAME/offset``; topk:
``NAME/idx``, ``NAME/val`` (both present, possibly empty, for every floating tensor).

Privacy: compression runs after DP-SGD's clipping and noise, on the update the silo would send anyway, so it is
post-processing and spends no privacy (Dwork & Roth 2014, "The Algorithmic Foundations of Differential
Privacy", Proposition 2.1). The residual is as private as the update and stays at the site.

:func:`decompress` trusts nothing in a payload: names, dtypes, shapes and sizes are checked against
:func:`payload_layout` of the coordinator's own reference model before any value is read, then indices and
values; every refusal is a :class:`CompressionError` with a stable ``code`` (:data:`ERROR_CODES`) and a
one-line message naming the array and what is wrong (never its values). Numpy only: no torch, no Flower.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

MODES = ("float32", "float16", "int8", "topk")

#: The stable reason codes of :class:`CompressionError`.
ERROR_CODES = (
    "missing_array",           # a name the layout needs is absent
    "unexpected_array",        # a name the layout does not have
    "not_an_array",            # a value that is not a numpy array
    "wrong_dtype",             # dtype differs from the layout's (exact numpy dtype string)
    "wrong_shape",             # shape differs (or a 1-D slot holds a non-1-D array)
    "too_many_elements",       # more elements than the layout allows (topk: more than k in total)
    "length_mismatch",         # topk: NAME/idx and NAME/val differ in length
    "index_out_of_range",      # topk: an index outside the tensor
    "indices_not_increasing",  # topk: indices not strictly increasing (duplicates included)
    "non_finite",              # NaN or infinity in values, offsets, or the decoded tensor
    "bad_scale",               # int8: a scale that is negative or not finite
    "residual_mismatch",       # compress: the error-feedback residual does not fit the update
)

FLOAT16_MAX = float(np.finfo(np.float16).max)  # 65504
_INT8_LEVELS = 255  # q + 128 in 0..255


class CompressionError(ValueError):
    """A payload that cannot be decoded; .code is a short stable reason code, str(exc) a one-line message."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = " ".join(message.split())
        super().__init__(self.message)


@dataclass(frozen=True)
class PayloadSlot:
    """One array a payload must carry.

    dtype: the exact numpy dtype string (``np.dtype(...).str``), e.g. ``"<f4"``, ``"<f2"``, ``"|i1"``, ``"<i4"``.
    shape: the exact shape, or None for a 1-D array of variable length (topk's idx/val).
    max_elements: the most elements this array may hold, for size checks before decoding.
    """

    dtype: str
    shape: tuple[int, ...] | None
    max_elements: int


_F4, _F2, _I1, _I4 = np.dtype("<f4").str, np.dtype("<f2").str, np.dtype("|i1").str, np.dtype("<i4").str


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"compression mode {mode!r} is not known; use one of: {', '.join(MODES)}")


def _check_fraction(fraction: float) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (0.0 < fraction <= 1.0):
        raise ValueError(f"topk_fraction {fraction!r} must be in (0, 1], e.g. 0.01 for 1% of the entries")


def is_compressed(array: np.ndarray) -> bool:
    """Whether a tensor of this dtype is compressed (floating point) rather than passed through unchanged."""
    return bool(np.issubdtype(np.asarray(array).dtype, np.floating))


def topk_count(total: int, topk_fraction: float) -> int:
    """``k = max(1, ceil(topk_fraction * total))`` entries (at most ``total``; 0 for an empty model).

    The product is rounded to 9 decimals before ``ceil`` so that, e.g., 0.07 * 100 gives 7, not 8 (binary
    floating point makes it 7.000000000000001); silo and coordinator call this same function.
    """
    _check_fraction(topk_fraction)
    if total <= 0:
        return 0
    return min(int(total), max(1, math.ceil(round(topk_fraction * total, 9))))


def _float_names(reference: Mapping[str, np.ndarray]) -> list[str]:
    return [name for name, array in reference.items() if is_compressed(array)]


def payload_layout(reference: Mapping[str, np.ndarray], mode: str, topk_fraction: float = 0.01) -> dict[str, PayloadSlot]:
    """Every array name a payload of this mode carries for a model shaped like ``reference``, and its limits.

    ``reference`` maps tensor names to arrays (only their dtypes and shapes are read). Raises ValueError for an
    unknown mode, a fraction outside (0, 1], or a reference whose names would collide with payload names
    (a non-floating tensor called ``X/q`` beside a floating ``X`` in int8 mode).
    """
    _check_mode(mode)
    total = sum(int(np.asarray(a).size) for a in reference.values() if is_compressed(a))
    kmax = topk_count(total, topk_fraction) if mode == "topk" else 0
    layout: dict[str, PayloadSlot] = {}

    def put(name: str, slot: PayloadSlot) -> None:
        if name in layout:
            raise ValueError(f"payload name {name!r} occurs twice in the {mode} layout: rename the model's tensor")
        layout[name] = slot

    for name, array in reference.items():
        array = np.asarray(array)
        shape, size = tuple(int(s) for s in array.shape), int(array.size)
        if not is_compressed(array):
            put(name, PayloadSlot(array.dtype.str, shape, size))
        elif mode in ("float32", "float16"):
            put(name, PayloadSlot(_F4 if mode == "float32" else _F2, shape, size))
        elif mode == "int8":
            put(f"{name}/q", PayloadSlot(_I1, shape, size))
            put(f"{name}/scale", PayloadSlot(_F4, (), 1))
            put(f"{name}/offset", PayloadSlot(_F4, (), 1))
        else:
            put(f"{name}/idx", PayloadSlot(_I4, None, min(size, kmax)))
            put(f"{name}/val", PayloadSlot(_F4, None, min(size, kmax)))
    return layout


# ------------------------------------------------------------------------------------------- compress


def _finite_or_raise(name: str, array: np.ndarray, what: str) -> None:
    if not np.isfinite(array).all():
        raise CompressionError("non_finite", f"{what} tensor '{name}' has NaN or infinite entries: compress only finite updates")


_F16_MIN_NORMAL = 2.0**-14  # below it float16 is subnormal, spaced 2**-24


def _float16(x: np.ndarray) -> np.ndarray:
    """IEEE round-half-even to float16, clipped to its finite range; bit-identical to ``astype(np.float16)``.

    numpy converts subnormal results on a slow path (measured: 30M float32 entries all below 2**-14 take 2.8 s
    against 0.22 s for normal ones), and small updates are mostly subnormal in float16. Those entries are
    written directly: a float16 subnormal is ``m * 2**-24`` with bit pattern ``sign << 15 | m``, so
    ``m = rint(|x| * 2**24)`` (an exact power-of-two scaling, then round-half-even); ``m = 1024`` is 0x0400,
    the smallest normal number, which is where such an ``x`` rounds to.
    """
    x = np.clip(x, -FLOAT16_MAX, FLOAT16_MAX)
    tiny = np.abs(x) < _F16_MIN_NORMAL
    if not tiny.any():
        return x.astype(np.float16)
    out = np.where(tiny, 0, x).astype(np.float16)
    small = x[tiny]
    m = np.rint(np.abs(small) * 2.0**24).astype(np.uint16)
    out.view(np.uint16)[tiny] = m | (np.signbit(small).astype(np.uint16) << 15)
    return out


def _int8(name: str, x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine int8 of one tensor with unbiased stochastic rounding: (q, scale, offset)."""
    if x.size == 0:
        return np.zeros(x.shape, np.int8), np.float32(0.0), np.float32(0.0)
    lo, hi = float(np.min(x)), float(np.max(x))
    offset = np.float32(lo)
    scale = np.float32((hi - lo) / _INT8_LEVELS)
    if not (np.isfinite(scale) and np.isfinite(offset)):
        raise CompressionError("non_finite", f"update tensor '{name}' spans a range too wide for float32 scale and offset")
    if scale == 0:
        return np.full(x.shape, -128, np.int8), scale, offset
    t = (x.astype(np.float32, copy=False) - offset) / scale  # in [0, 255] up to float rounding
    t += rng.random(t.shape, dtype=np.float32)
    np.floor(t, out=t)
    np.clip(t, 0, _INT8_LEVELS, out=t)
    t -= 128
    return t.astype(np.int8), scale, offset


def _topk(floats: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """Per tensor, the sorted flat indices (int64) of the global top-k of ``floats`` by magnitude."""
    names = list(floats)
    sizes = [floats[n].size for n in names]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    chosen: dict[str, np.ndarray] = {n: np.zeros(0, np.int64) for n in names}
    if k <= 0:
        return chosen
    magnitude = np.empty(int(starts[-1]), dtype=np.float32)
    for n, s in zip(names, starts[:-1]):
        np.abs(floats[n].reshape(-1), out=magnitude[s:s + floats[n].size], casting="same_kind")
    if k < magnitude.size:
        picked = np.argpartition(magnitude, magnitude.size - k)[magnitude.size - k:]
    else:
        picked = np.arange(magnitude.size)
    picked.sort()
    cuts = np.searchsorted(picked, starts)
    for i, n in enumerate(names):
        chosen[n] = picked[cuts[i]:cuts[i + 1]] - starts[i]
    return chosen


def compress(delta: Mapping[str, np.ndarray], mode: str, *, topk_fraction: float = 0.01,
             residual: Mapping[str, np.ndarray] | None = None,
             rng: np.random.Generator | None = None) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """(payload arrays, new residual). The residual is top-k's error feedback (None for other modes).

    Args:
        delta: the update (local - global) by tensor name; floating tensors are compressed, others copied.
        mode: one of :data:`MODES`.
        topk_fraction: topk only: the share of the model's floating entries sent, in (0, 1].
        residual: topk only: the error-feedback memory from this silo's previous round (names: the floating
            tensors', same shapes), or None for the first round (zeros). Ignored by the other modes.
        rng: int8 only: the generator for stochastic rounding (default: a fresh one seeded by the OS).

    Returns the payload (names as in the module docstring) and, for topk, the new residual
    ``delta + residual - sent`` (float32 or wider) that the caller persists for the next round.

    Raises CompressionError ``non_finite`` for a delta or residual with NaN/inf, ``residual_mismatch`` for a
    residual whose names or shapes differ from the delta's floating tensors; ValueError for an unknown mode
    or a fraction outside (0, 1].
    """
    _check_mode(mode)
    if mode == "topk":
        _check_fraction(topk_fraction)
    payload: dict[str, np.ndarray] = {}
    floats: dict[str, np.ndarray] = {}
    for name, array in delta.items():
        array = np.asarray(array)
        if not is_compressed(array):
            payload[name] = array.copy()
            continue
        _finite_or_raise(name, array, "update")
        floats[name] = array
    if mode == "float32":
        payload.update({n: x.astype(np.float32) for n, x in floats.items()})
        return _ordered(payload, delta, mode), None
    if mode == "float16":
        payload.update({n: _float16(x) for n, x in floats.items()})
        return _ordered(payload, delta, mode), None
    if mode == "int8":
        rng = rng if rng is not None else np.random.default_rng()
        for n, x in floats.items():
            q, scale, offset = _int8(n, x, rng)
            payload[f"{n}/q"], payload[f"{n}/scale"], payload[f"{n}/offset"] = q, np.asarray(scale), np.asarray(offset)
        return _ordered(payload, delta, mode), None

    # topk with error feedback: a = delta + residual; send top_k(a); keep a - sent.
    if residual is not None:
        if set(residual) != set(floats):
            missing, extra = sorted(set(floats) - set(residual)), sorted(set(residual) - set(floats))
            raise CompressionError("residual_mismatch", f"the error-feedback residual does not match the update's floating "
                                   f"tensors (missing {missing[:3]}, extra {extra[:3]}): start again from no residual")
        for n, x in floats.items():
            r = np.asarray(residual[n])
            if r.shape != x.shape:
                raise CompressionError("residual_mismatch", f"residual '{n}' has shape {r.shape}, the update {x.shape}: "
                                       "start again from no residual")
            _finite_or_raise(n, r, "residual")
    accumulated: dict[str, np.ndarray] = {}
    for n, x in floats.items():
        wide = np.result_type(x.dtype, np.float32)
        a = x.astype(wide, copy=True)
        if residual is not None:
            a += np.asarray(residual[n], dtype=wide)
        accumulated[n] = a
    total = sum(a.size for a in accumulated.values())
    chosen = _topk(accumulated, topk_count(total, topk_fraction))
    new_residual: dict[str, np.ndarray] = {}
    for n, a in accumulated.items():
        idx = chosen[n]
        flat = a.reshape(-1)
        val = flat[idx].astype(np.float32)
        payload[f"{n}/idx"] = idx.astype(np.int32)
        payload[f"{n}/val"] = val
        flat[idx] -= val  # the residual: what was not sent (0 at sent entries, up to float32 rounding)
        new_residual[n] = a
    return _ordered(payload, delta, mode), new_residual


def _ordered(payload: dict[str, np.ndarray], delta: Mapping[str, np.ndarray], mode: str) -> dict[str, np.ndarray]:
    """The payload in the layout's order (the model's tensor order)."""
    return {n: payload[n] for n in payload_layout(delta, mode, 1.0)}


# ----------------------------------------------------------------------------------------- decompress


def _fail(code: str, message: str) -> CompressionError:
    return CompressionError(code, message)


def _check_structure(payload: Mapping[str, np.ndarray], layout: dict[str, PayloadSlot], mode: str) -> None:
    """Names, types, dtypes, shapes and sizes, before any value is read."""
    names = set(payload)
    missing = [n for n in layout if n not in names]
    if missing:
        raise _fail("missing_array", f"{mode} payload lacks array '{missing[0]}'"
                    + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    extra = [n for n in payload if n not in layout]
    if extra:
        shown = extra[0] if isinstance(extra[0], str) else f"of type {type(extra[0]).__name__}"
        raise _fail("unexpected_array", f"{mode} payload has an array the model does not have: '{shown}'"
                    + (f" and {len(extra) - 1} more" if len(extra) > 1 else ""))
    for name, slot in layout.items():
        array = payload[name]
        if not isinstance(array, np.ndarray):
            raise _fail("not_an_array", f"payload entry '{name}' is a {type(array).__name__}, not a numpy array")
        if array.dtype.str != slot.dtype:
            raise _fail("wrong_dtype", f"payload array '{name}' has dtype {array.dtype.str}, expected {slot.dtype}")
        if slot.shape is not None and array.shape != slot.shape:
            raise _fail("wrong_shape", f"payload array '{name}' has shape {array.shape}, expected {slot.shape}")
        if slot.shape is None and array.ndim != 1:
            raise _fail("wrong_shape", f"payload array '{name}' has {array.ndim} dimensions, expected a 1-D array")
        if array.size > slot.max_elements:
            raise _fail("too_many_elements", f"payload array '{name}' has {array.size} elements, at most {slot.max_elements} allowed")


def decompress(payload: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray], mode: str, *,
               topk_fraction: float = 0.01) -> dict[str, np.ndarray]:
    """Dense arrays with exactly reference's names, shapes and dtypes; CompressionError on anything malformed.

    Checks, in this order (each refusal a distinct code of :data:`ERROR_CODES`):

    1. names: every name of ``payload_layout(reference, mode, topk_fraction)`` present, no other;
    2. per array: a numpy array, the exact dtype, the exact shape (1-D for topk's idx/val), at most its
       ``max_elements``;
    3. per mode: finite values (float32/float16/topk values, int8 offsets), int8 scales finite and >= 0;
       topk idx/val of equal length, indices in range and strictly increasing, at most ``k`` in total;
    4. the decoded tensor is finite (an int8 scale and offset may still overflow float32 together).

    ``reference`` is the coordinator's own model (only names, dtypes and shapes are read). Non-floating tensors
    are returned as sent (copied) after the dtype and shape check.
    """
    _check_mode(mode)
    layout = payload_layout(reference, mode, topk_fraction)
    _check_structure(payload, layout, mode)
    out: dict[str, np.ndarray] = {}
    if mode == "topk":
        total = sum(int(np.asarray(a).size) for a in reference.values() if is_compressed(a))
        kmax = topk_count(total, topk_fraction)
        sent = sum(int(payload[f"{n}/idx"].size) for n in _float_names(reference))
        if sent > kmax:
            raise _fail("too_many_elements", f"topk payload carries {sent} entries in total, at most {kmax} "
                        f"(topk_fraction {topk_fraction} of {total}) allowed")
    for name, ref in reference.items():
        ref = np.asarray(ref)
        if not is_compressed(ref):
            out[name] = payload[name].copy()
            continue
        if mode in ("float32", "float16"):
            x = payload[name]
            if not np.isfinite(x).all():
                raise _fail("non_finite", f"payload array '{name}' has NaN or infinite entries")
            dense = x.astype(ref.dtype)
        elif mode == "int8":
            q, scale, offset = payload[f"{name}/q"], payload[f"{name}/scale"][()], payload[f"{name}/offset"][()]
            if not (np.isfinite(scale) and scale >= 0):
                raise _fail("bad_scale", f"payload array '{name}/scale' is negative or not finite")
            if not np.isfinite(offset):
                raise _fail("non_finite", f"payload array '{name}/offset' is not finite")
            dense = q.astype(np.float32)
            with np.errstate(over="ignore", invalid="ignore"):  # overflow is refused just below
                dense += np.float32(128)
                dense *= scale
                dense += offset
            if not np.isfinite(dense).all():
                raise _fail("non_finite", f"tensor '{name}' decodes to infinite values (scale and offset too large)")
            dense = dense.astype(ref.dtype, copy=False)
        else:
            idx, val = payload[f"{name}/idx"], payload[f"{name}/val"]
            if idx.size != val.size:
                raise _fail("length_mismatch", f"payload arrays '{name}/idx' and '{name}/val' differ in length "
                            f"({idx.size} and {val.size})")
            if idx.size:
                if int(idx.min()) < 0 or int(idx.max()) >= ref.size:
                    raise _fail("index_out_of_range", f"payload array '{name}/idx' has an index outside 0..{ref.size - 1}")
                if idx.size > 1 and not bool(np.all(idx[1:] > idx[:-1])):
                    raise _fail("indices_not_increasing", f"payload array '{name}/idx' is not strictly increasing")
                if not np.isfinite(val).all():
                    raise _fail("non_finite", f"payload array '{name}/val' has NaN or infinite entries")
            dense = np.zeros(ref.size, dtype=ref.dtype)
            dense[idx] = val
            dense = dense.reshape(ref.shape)
        out[name] = dense
    return out


def payload_nbytes(payload: Mapping[str, np.ndarray]) -> int:
    """Sum of the arrays' raw data bytes (what the payload weighs before any framing)."""
    return int(sum(np.asarray(a).nbytes for a in payload.values()))


__all__ = [
    "ERROR_CODES", "FLOAT16_MAX", "MODES", "CompressionError", "PayloadSlot", "compress", "decompress",
    "is_compressed", "payload_layout", "payload_nbytes", "topk_count",
]
