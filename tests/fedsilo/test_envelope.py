"""The sealed envelope (fedsilo.envelope): a plain round's content travels as one Flower object, opens to exactly the
records sealed, a large content is left to Flower's chunked transfer, and every malformed envelope is refused with a
message that echoes none of its bytes."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

from fedsilo import envelope
from fedsilo import protocol as P
from fedsilo.envelope import EnvelopeError, is_sealed, open_content, seal
from fedsilo.wire import pack, unpack_record


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
    opened = open_content(sealed)
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
    assert open_content(content) is content


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
        open_content(bad())
    assert "PATIENT" not in str(caught.value) and "garbage" not in str(caught.value)


def test_an_envelope_naming_a_record_twice_is_refused():
    proto = recorddict_to_proto(RecordDict({P.METRICS: MetricRecord({"dice": 0.5})}))
    proto.items.append(proto.items[0])
    with pytest.raises(EnvelopeError, match="names a record twice"):
        open_content(_sealed(proto.SerializeToString()))


def test_an_envelope_over_the_size_limit_is_refused_before_decoding(monkeypatch):
    blob = recorddict_to_proto(_content()).SerializeToString()
    monkeypatch.setattr(envelope, "MAX_SEALED_BYTES", len(blob) - 1)
    with pytest.raises(EnvelopeError, match=f"is {len(blob)} bytes, more than"):
        open_content(_sealed(blob))


def test_an_array_record_of_several_arrays_survives_the_round_trip():
    arrays = ArrayRecord({"a": Array(np.ones((2, 2), np.float32)), "b": Array(np.zeros(3, np.int64))})
    opened = open_content(seal(RecordDict({P.ARRAYS: arrays})))
    assert [k for k in opened[P.ARRAYS].keys()] == ["a", "b"]
    assert np.array_equal(opened[P.ARRAYS]["b"].numpy(), np.zeros(3, np.int64))
