"""A model's tensors on the wire: all of them packed into one Flower ``Array``, as one safetensors blob.

Flower 1.42 sends a message as a tree of objects (the message, its RecordDict, each record, each ``Array``
and each of its chunks), and every object is its own authenticated request on each hop (SuperNode to
SuperLink to ServerApp and back). With one ``Array`` per tensor a 14-tensor model is about 30 objects per
message, and on a busy SuperLink each costs 0.1 s or more (docs/benchmarks.md, "Round overhead"). Packed,
the model is two objects (an ``Array`` and its chunk; more chunks only past Flower's 5 MB chunk size).

The blob is safetensors (Hugging Face's format, made to be read from untrusted sources: an 8-byte little-
endian header length, a JSON header with each tensor's dtype, shape and byte offsets, then the raw little-
endian data; never pickle). :func:`describe` reads only the header, so a receiver can check names, dtypes
and shapes against what it expects before any tensor is materialized; :func:`unpack` then decodes through
the safetensors library, which checks that the offsets tile the data exactly.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

STYPE = "safetensors"  # the packed Array's serialization type (Flower's own arrays say "numpy.ndarray")
PACKED_KEY = "tensors"  # the one key of a packed ArrayRecord
HEADER_MAX = 1 << 20  # bytes of JSON header accepted (a few hundred tensors need a few tens of kB)
MAX_DIMS = 8  # a tensor's dimensions (a 3D convolution's weight has 5)
MAX_DIM = 1 << 40  # the largest single dimension accepted (bounds the size arithmetic on untrusted numbers)
# safetensors dtype codes <-> numpy (the subset numpy has; bfloat16 and float8 never travel here).
_CODES = {"BOOL": "|b1", "U8": "|u1", "I8": "|i1", "U16": "<u2", "I16": "<i2", "F16": "<f2", "U32": "<u4", "I32": "<i4",
          "F32": "<f4", "U64": "<u8", "I64": "<i8", "F64": "<f8"}


class WireError(ValueError):
    """A packed record that is not what it claims: the message says what is wrong, without echoing its bytes."""


class TooLarge(WireError):
    """A packed record bigger than its receiver allows (checked before anything is copied or decoded)."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # numpy dtype.str, e.g. "<f4"
    shape: tuple[int, ...]

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


def pack(state: Mapping[str, object]):
    """``ArrayRecord`` holding every tensor of ``state`` (numpy arrays or torch tensors) in one safetensors blob."""
    from flwr.app import Array, ArrayRecord
    from safetensors.numpy import save

    arrays = {str(name): np.asarray(_as_numpy(value), order="C") for name, value in state.items()}  # 0-d stays 0-d
    blob = save(arrays)
    return ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(len(blob),), stype=STYPE, data=blob)})


def blob_of(record, *, max_bytes: int | None = None) -> bytes:
    """The packed blob of ``record``; WireError unless it is exactly one safetensors Array (of at most ``max_bytes``)."""
    keys = list(record.keys())
    if keys != [PACKED_KEY]:
        raise WireError(f"the tensors are not packed as one '{PACKED_KEY}' array ({len(keys)} arrays)")
    array = record[PACKED_KEY]
    if array.stype != STYPE or array.dtype != "uint8":
        raise WireError(f"the packed array is of type {ascii(str(array.stype)[:40])}, expected '{STYPE}'")
    size = len(array.data)
    if max_bytes is not None and size > max_bytes:
        raise TooLarge(f"the packed tensors take {size} bytes, at most {max_bytes} are expected")
    if tuple(array.shape) != (size,):  # the Array's own shape field is free for anything else
        raise WireError("the packed array's shape is not its byte count")
    return bytes(array.data)


def describe(blob: bytes) -> dict[str, TensorInfo]:
    """Names, dtypes and shapes from a blob's header, checked for consistency, without decoding any tensor.

    Written here rather than taken from the library because safetensors' Python API reads a header only from
    a file (``safe_open``); this is the same format (8-byte length, JSON), and :func:`unpack` still decodes
    through the library. Messages name tensors by position, never by the (untrusted) name.
    """
    if len(blob) < 8:
        raise WireError("the packed tensors are shorter than their header")
    (length,) = struct.unpack("<Q", blob[:8])
    if length > HEADER_MAX or 8 + length > len(blob):
        raise WireError(f"the packed tensors' header claims {length} bytes, which the blob does not hold (limit {HEADER_MAX})")
    try:
        header = json.loads(blob[8:8 + length].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise WireError("the packed tensors' header is not valid JSON (or repeats a name)") from None
    if not isinstance(header, dict):
        raise WireError("the packed tensors' header is not a JSON object")
    if "__metadata__" in header:  # free text beside the tensors: nothing of the kind is ever sent
        raise WireError("the packed tensors carry metadata")
    infos, spans = {}, []
    for i, (name, entry) in enumerate(header.items()):
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise WireError(f"tensor #{i} has a malformed header entry")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _CODES:
            raise WireError(f"tensor #{i} has an unsupported dtype")
        if (not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets)):
            raise WireError(f"tensor #{i} has a malformed shape or offsets")
        info = TensorInfo(dtype=_CODES[dtype], shape=tuple(shape))
        begin, end = offsets
        if not 0 <= begin <= end or end - begin != info.elements * np.dtype(info.dtype).itemsize:
            raise WireError(f"tensor #{i} has offsets that do not match its shape")
        infos[name] = info
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise WireError("the packed tensors' offsets leave gaps or overlap")
        position = end
    if 8 + length + position != len(blob):
        raise WireError("the packed tensors' data does not match the header's offsets")
    return infos


def unpack(blob: bytes, *, canonical: bool = True) -> dict[str, np.ndarray]:
    """Writable numpy arrays from a blob (call :func:`describe` first to check it against expectations).

    ``canonical``: also require the blob to be byte for byte what :func:`pack` writes for those arrays, so that
    nothing rides in the header's layout (whitespace, key order, escapes) beside the tensors.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load, save

    describe(blob)
    try:
        arrays = {name: np.array(value) for name, value in load(blob).items()}  # np.array: a writable copy
    except SafetensorError as exc:
        raise WireError(f"the packed tensors do not decode ({type(exc).__name__})") from None
    if canonical and save(arrays) != blob:
        raise WireError("the packed tensors are not in fedsilo's encoding (the header carries more than the tensors)")
    return arrays


def unpack_record(record, *, max_bytes: int | None = None) -> dict[str, np.ndarray]:
    """:func:`unpack` of a packed ``ArrayRecord``."""
    return unpack(blob_of(record, max_bytes=max_bytes))


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """json object hook: a name given twice would hide the first value from every check (JSON keeps the last)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        raise ValueError("duplicate name")
    return out


def _as_numpy(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    detach = getattr(value, "detach", None)
    if detach is not None:  # a torch tensor
        return detach().cpu().numpy()
    return np.asarray(value)
