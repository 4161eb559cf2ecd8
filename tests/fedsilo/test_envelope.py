"""The sealed envelope (fedsilo.envelope): a plain round's content travels as one Flower object, opens to exactly the
records sealed, a large content is left to Flower's chunked transfer, and every malformed envelope is refused with a
message that echoes none of its bytes."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsilo import envelope
from fedsilo import protocol as P
from fedsilo.envelope import EnvelopeError, is_sealed, open_content, seal
from fedsilo.wire import pack, unpack_record

# The records of _content, as a receiver would allow them (the protocol's two directions are tested below).
ANY = {P.ARRAYS: "array_record", P.CONFIG: "config_record", P.METRICS: "metric_record"}


def _content(nbytes: int = 4096) -> RecordDict:
    return RecordDict({
        P.ARRAYS: pack({"w": np.arange(nbytes // 4, dtype=np.float32)}),
        P.CONFIG: ConfigRecord({P.PLAN_YAML: "name: t\n", P.ROUND: 3, P.PROOF: [b"\x01" * 32, b"\x02" * 32], "flag": True}),
        P.METRICS: MetricRecord({"dice": 0.75, P.NUM_EXAMPLES: 12}),
    })


def _objects(content: RecordDict) -> int:
    """Flower objects a message with this content is on the wire (each one request per hop)."""
    return len(get_all_nested_objects(Message(content=content, message_type="train", dst_node_id=1)))


@pytest.fixture(autouse=True)
def serverapp_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def test_a_sealed_content_opens_to_the_same_records_and_values():
    content = _content()
    sealed = seal(content)
    assert is_sealed(sealed) and list(sealed.keys()) == [P.ENVELOPE]
    opened = open_content(sealed, ANY)
    assert list(opened.keys()) == list(content.keys())
    assert dict(opened[P.CONFIG]) == dict(content[P.CONFIG]) and dict(opened[P.METRICS]) == dict(content[P.METRICS])
    assert np.array_equal(unpack_record(opened[P.ARRAYS])["w"], unpack_record(content[P.ARRAYS])["w"])
    assert isinstance(opened[P.METRICS], MetricRecord) and isinstance(opened[P.ARRAYS], ArrayRecord)


def test_a_sealed_message_is_three_flower_objects_instead_of_one_per_record_and_array():
    content = _content()
    assert _objects(content) == 7  # message, RecordDict, ArrayRecord, Array, its chunk, ConfigRecord, MetricRecord
    assert _objects(seal(content)) == 3  # message, RecordDict, envelope


def test_an_unsealed_content_passes_through_unchanged():
    content = _content()
    assert open_content(content, P.RECORDS_TO_SILO) is content


def test_a_content_too_large_to_seal_keeps_flowers_chunked_transfer():
    big = _content(envelope.MAX_SEALED_BYTES + 4)
    assert seal(big) is big
    # Under the array threshold but over the whole-content one (a large ConfigRecord value): also left as it is.
    wide = RecordDict({P.CONFIG: ConfigRecord({"blob": b"\0" * envelope.MAX_SEALED_BYTES})})
    assert seal(wide) is wide


def test_sealing_twice_is_refused():
    with pytest.raises(EnvelopeError, match="already sealed"):
        seal(seal(_content()))


def _sealed(blob: bytes, **extra) -> RecordDict:
    return RecordDict({P.ENVELOPE: ConfigRecord({P.ENVELOPE: blob, **extra})})


@pytest.mark.parametrize("bad, why", [
    (lambda: RecordDict({P.ENVELOPE: ConfigRecord({P.ENVELOPE: b""}), P.METRICS: MetricRecord({"dice": 1.0})}), "beside its envelope"),
    (lambda: _sealed(b"", other=1), "one ConfigRecord holding one bytes value"),
    (lambda: RecordDict({P.ENVELOPE: ConfigRecord({P.ENVELOPE: "text"})}), "one bytes value"),
    (lambda: RecordDict({P.ENVELOPE: MetricRecord({P.ENVELOPE: 1.0})}), "one ConfigRecord"),
    (lambda: _sealed(b"\xff\xff\xff\xff garbage PATIENT^NAME"), "does not decode"),
    (lambda: _sealed(recorddict_to_proto(seal(_content())).SerializeToString()), "inside an envelope"),
])
def test_a_malformed_envelope_is_refused_without_echoing_its_bytes(bad, why):
    with pytest.raises(EnvelopeError, match=why) as caught:
        open_content(bad(), ANY)
    assert "PATIENT" not in str(caught.value) and "garbage" not in str(caught.value)


def test_an_envelope_naming_a_record_twice_is_refused():
    proto = recorddict_to_proto(RecordDict({P.METRICS: MetricRecord({"dice": 0.5})}))
    proto.items.append(proto.items[0])
    with pytest.raises(EnvelopeError, match="names a record twice"):
        open_content(_sealed(proto.SerializeToString()), ANY)


def test_an_envelope_over_the_size_limit_is_refused_before_decoding(monkeypatch):
    blob = recorddict_to_proto(_content()).SerializeToString()
    monkeypatch.setattr(envelope, "MAX_SEALED_BYTES", len(blob) - 1)
    with pytest.raises(EnvelopeError, match=f"is {len(blob)} bytes, more than"):
        open_content(_sealed(blob), ANY)


def test_an_array_record_of_several_arrays_survives_the_round_trip():
    arrays = ArrayRecord({"a": Array(np.ones((2, 2), np.float32)), "b": Array(np.zeros(3, np.int64))})
    opened = open_content(seal(RecordDict({P.ARRAYS: arrays})), ANY)
    assert [k for k in opened[P.ARRAYS].keys()] == ["a", "b"]
    assert np.array_equal(opened[P.ARRAYS]["b"].numpy(), np.zeros(3, np.int64))


def _proto(**records):
    """A parsed-RecordDict protobuf with ``records``: name -> (kind, [(item key, value field, value)])."""
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    proto = ProtoRecordDict()
    for name, (kind, entries) in records.items():
        item = proto.items.add()
        item.key = name
        record = getattr(item, kind)
        record.SetInParent()
        for key, field, value in entries:
            entry = record.items.add()
            entry.key = key
            if field is not None:
                target = getattr(entry.value, field)
                target.vals.extend(value) if field.endswith("_list") else setattr(entry.value, field, value)
    return proto.SerializeToString()


@pytest.mark.parametrize("blob, why", [
    # 17 bytes: an item whose value sets no field (Flower's decoder raised AttributeError on it)
    (lambda: _proto(config=("config_record", [("x", None, None)])), "has an item with no value"),
    (lambda: _proto(config=("metric_record", [("x", "double", 1.0)])), "is a metric_record, not a config_record"),
    (lambda: _proto(notes=("config_record", [("x", "string", "free text")])), "does not accept"),
    (lambda: _proto(config=("config_record", [(f"k{i}", "sint64", i) for i in range(envelope.MAX_ITEMS + 1)])),
     f"holds {envelope.MAX_ITEMS + 1} items"),
    (lambda: _proto(config=("config_record", [("x", "bytes_list", [b"h"] * (envelope.MAX_LIST + 1))])), "list of more than"),
    (lambda: _proto(config=("config_record", [("round", "sint64", 1), ("round", "sint64", 2)])), "names an item twice"),
])
def test_records_are_checked_for_name_kind_and_size_before_flower_builds_them(blob, why):
    with pytest.raises(EnvelopeError, match=why):
        open_content(_sealed(blob()), P.RECORDS_TO_SILO)


def test_a_record_of_no_kind_is_refused():
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    proto = ProtoRecordDict()
    proto.items.add().key = P.CONFIG
    with pytest.raises(EnvelopeError, match="record of no kind"):
        open_content(_sealed(proto.SerializeToString()), P.RECORDS_TO_SILO)


def test_each_direction_opens_only_what_the_protocol_sends_that_way():
    down = RecordDict({P.ARRAYS: pack({"w": np.ones(3, np.float32)}), P.CONFIG: ConfigRecord({P.ROUND: 1}),
                       P.EVALUATE: ConfigRecord({P.ROUND: 0}), P.WITNESS: ConfigRecord({P.OLD_SIZE: 0})})
    up = RecordDict({P.ARRAYS: pack({"w": np.ones(3, np.float32)}), P.METRICS: MetricRecord({"dice": 0.5}),
                     P.IDENTITY: ConfigRecord({P.SITE: "hospital0"}), P.EVALUATION: MetricRecord({"dice": 0.4}),
                     P.WITNESS: ConfigRecord({P.COSIGNED: b"note"})})
    assert list(open_content(seal(down), P.RECORDS_TO_SILO).keys()) == list(down.keys())
    assert list(open_content(seal(up), P.RECORDS_FROM_SILO).keys()) == list(up.keys())
    with pytest.raises(EnvelopeError, match="does not accept"):
        open_content(seal(up), P.RECORDS_TO_SILO)  # a silo is sent no metrics
    with pytest.raises(EnvelopeError, match="does not accept"):
        open_content(seal(down), P.RECORDS_FROM_SILO)  # a silo sends no plan


_VALID = recorddict_to_proto(_content(256)).SerializeToString()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_mutated_envelope_opens_or_is_refused_never_anything_else(data):
    """Fuzzing (hypothesis): flipped, cut and inserted bytes of a valid envelope either open to records or raise
    EnvelopeError; no other exception reaches the round loop (one did, AttributeError, before the shape checks)."""
    blob = bytearray(_VALID)
    for _ in range(data.draw(st.integers(1, 6))):
        at = data.draw(st.integers(0, len(blob) - 1))
        action = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        if action == "flip":
            blob[at] ^= data.draw(st.integers(1, 255))
        elif action == "cut":
            del blob[at:at + data.draw(st.integers(1, 16))]
        else:
            blob[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        if not blob:
            blob = bytearray(b"\x00")
    try:
        opened = open_content(_sealed(bytes(blob)), ANY)
    except EnvelopeError:
        return
    assert set(opened.keys()) <= set(ANY)
