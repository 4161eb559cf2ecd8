"""The packed wire format (fedsilo.wire): a round trip for every dtype fedsilo sends, Flower's object count,
and each malformed blob refused by its header, with a message that names the defect and echoes no bytes."""

import json
import struct

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedsilo import wire


def _blob(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _raw(header: str, nbytes: int) -> bytes:
    text = header.encode()
    return struct.pack("<Q", len(text)) + text + bytes(nbytes)


def test_round_trip_keeps_names_dtypes_shapes_and_values():
    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "scalar": np.array(7, np.int64), "h": np.ones(4, np.float16),
             "q": np.array([-128, 0, 127], np.int8), "m": np.array([1, 2**32 - 1], np.uint32), "f": np.array([True, False]),
             "d": np.zeros(0, np.float64), "t": torch.full((2, 2), 0.5), "strided": np.arange(12.0).reshape(3, 4).T}
    blob = wire.blob_of(wire.pack(state))
    info = wire.describe(blob)
    back = wire.unpack(blob)
    assert set(back) == set(info) == set(state)
    for name, value in state.items():
        expected = value.numpy() if isinstance(value, torch.Tensor) else value
        assert back[name].dtype == expected.dtype and back[name].shape == expected.shape == info[name].shape
        assert np.array_equal(back[name], expected) and back[name].flags.writeable
    assert back["scalar"].ndim == 0  # a 0-d tensor stays 0-d


def test_a_model_is_three_flower_objects_whatever_its_tensor_count():
    state = {f"layer{i}.weight": np.full((8, 8), i, np.float32) for i in range(14)}
    packed = get_all_nested_objects(wire.pack(state))
    per_tensor = get_all_nested_objects(ArrayRecord({k: Array(v) for k, v in state.items()}))
    assert len(packed) == 3 and len(per_tensor) == 1 + 2 * 14
    # a message's content: its RecordDict, the config record and the three objects of the model (plus the message)
    content = RecordDict({"arrays": wire.pack(state), "config": ConfigRecord({"round": 1})})
    assert len(get_all_nested_objects(content)) == 5


def test_max_bytes_is_checked_before_the_blob_is_copied():
    record = wire.pack({"w": np.zeros(1000, np.float32)})
    with pytest.raises(wire.TooLarge, match="at most 100 are expected"):
        wire.blob_of(record, max_bytes=100)


@pytest.mark.parametrize("record, message", [
    (ArrayRecord({"w": Array(np.zeros(3, np.float32))}), "not packed as one 'tensors' array"),
    (ArrayRecord({wire.PACKED_KEY: Array(np.zeros(3, np.uint8))}), "of type 'numpy.ndarray'"),
])
def test_only_a_packed_record_is_accepted(record, message):
    with pytest.raises(wire.WireError, match=message):
        wire.blob_of(record)


GOOD = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


@pytest.mark.parametrize("blob, message", [
    (b"\x01\x00", "shorter than their header"),
    (struct.pack("<Q", 2**40) + b"{}", "claims"),
    (struct.pack("<Q", 3) + b"\xff\xfe{", "not valid JSON"),
    (struct.pack("<Q", 100_006) + b'{"w":' + b"[" * 100_000 + b"1", "not valid JSON"),  # nested past the recursion limit
    (_raw('{"w": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}', 8), "unsupported dtype"),
    (_raw('{"w": {"dtype": "F32", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 8]}}', 8), "not valid JSON"),
    (_raw('{"w": {"dtype": "F32", "shape": [' + ", ".join(["1"] * 9) + '], "data_offsets": [0, 4]}}', 4), "malformed shape"),
    (_raw('{"w": {"dtype": "F32", "shape": [1099511627777], "data_offsets": [0, 8]}}', 8), "malformed shape"),
    (_raw('{"w": "DOE^JANE", "w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', 8), "repeats a name"),
    (_blob([1, 2], b""), "not a JSON object"),
    (_blob({"__metadata__": {"name": "DOE^JANE"}, **GOOD}, bytes(8)), "carry metadata"),
    (_blob({"w": {"dtype": "F32", "shape": [2]}}, bytes(8)), "malformed header entry"),
    (_blob({"w": {"dtype": "O", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)), "unsupported dtype"),
    (_blob({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, bytes(8)), "malformed shape"),
    (_blob({"w": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, bytes(8)), "malformed shape"),
    (_blob({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 800]}}, bytes(800)), "do not match its shape"),
    (_blob({**GOOD, "v": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, bytes(12)), "gaps or overlap"),
    (_blob({"w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, bytes(16)), "gaps or overlap"),
    (_blob(GOOD, bytes(9)), "does not match the header"),
])
def test_a_malformed_blob_is_refused_by_its_header(blob, message):
    with pytest.raises(wire.WireError, match=message) as err:
        wire.unpack(blob)
    assert "DOE" not in str(err.value)


def test_describe_reads_the_header_only():
    # a header for 1 GiB of float32 with only 8 bytes behind it: refused without allocating anything
    blob = _blob({"w": {"dtype": "F32", "shape": [2**28], "data_offsets": [0, 2**30]}}, bytes(8))
    with pytest.raises(wire.WireError, match="does not match the header"):
        wire.describe(blob)


@pytest.mark.parametrize("rewrite", [
    lambda header: header + b" " * 64,  # whitespace padding
    lambda header: header.replace(b'"w"', b'"\\u0077"'),  # the same name, escaped
])
def test_only_the_canonical_encoding_decodes(rewrite):
    blob = wire.blob_of(wire.pack({"w": np.ones(2, np.float32), "v": np.zeros(3, np.int8)}))
    (length,) = struct.unpack("<Q", blob[:8])
    header = rewrite(blob[8:8 + length])
    forged = struct.pack("<Q", len(header)) + header + blob[8 + length:]
    assert wire.describe(forged).keys() == {"w", "v"}  # a consistent header...
    with pytest.raises(wire.WireError, match="not in fedsilo's encoding"):
        wire.unpack(forged)  # ...that carries more than the tensors
    assert wire.unpack(forged, canonical=False)["w"].tolist() == [1.0, 1.0]


def test_the_arrays_own_shape_must_be_its_byte_count():
    blob = wire.blob_of(wire.pack({"w": np.ones(2, np.float32)}))
    smuggled = ArrayRecord({wire.PACKED_KEY: Array(dtype="uint8", shape=tuple(map(ord, "DOE^JANE")), stype=wire.STYPE, data=blob)})
    with pytest.raises(wire.WireError, match="shape is not its byte count"):
        wire.blob_of(smuggled)
