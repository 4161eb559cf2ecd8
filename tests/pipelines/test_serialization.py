"""Untrusted .npy payloads: the header is checked before anything is allocated."""

from __future__ import annotations

import io

import numpy as np
import pytest

from pipelines.serialization import clip_to_norm, l2_norm, read_npy


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=True)
    return buf.getvalue()


def _header_only(shape, descr="<f4") -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def test_a_valid_payload_round_trips():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    assert np.array_equal(read_npy(_npy(a), max_elements=12), a)
    assert read_npy(_npy(np.float32(2.5)), max_elements=1).shape == ()
    f = np.asfortranarray(a)
    assert np.array_equal(read_npy(_npy(f), max_elements=12), a)


@pytest.mark.parametrize("blob, words", [
    (_header_only((2**40,)), "claims 1099511627776 entries"),  # np.load would try to allocate 4 TiB
    (_header_only((4,)) + b"\0" * 8, "holds 8 bytes, its header needs 16"),
    (_npy(np.array([{"a": 1}], dtype=object)), "Python objects"),
    (b"not an npy file at all", "not a valid .npy header"),
])
def test_malformed_or_hostile_payloads_are_refused_before_allocation(blob, words):
    with pytest.raises(ValueError, match=words):
        read_npy(blob, max_elements=1000)


def test_clip_to_norm_scales_floating_tensors_only_when_over():
    state = {"w": np.full(4, 3.0, np.float32), "n": np.array(7, np.int64)}
    same, clipped = clip_to_norm(state, 10.0)
    assert not clipped and np.array_equal(same["w"], state["w"])
    out, clipped = clip_to_norm(state, 3.0)
    assert clipped and abs(l2_norm(out) - 3.0) < 1e-5 and out["n"] == 7 and out["w"].dtype == np.float32
