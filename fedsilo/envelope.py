"""A small message's records on the wire as one Flower object: the sealed envelope.

Flower 1.42 moves a message as a tree of objects (the message, its RecordDict, every record, every ``Array``
and each of its chunks), and every object is an authenticated request of its own on every hop (ServerApp to
SuperLink to SuperNode to ClientApp, and back). A train message with the model, the plan, an evaluation
request and a witness request is 8 objects; its reply (update, metrics, identity, evaluation, cosignature) 9.
Per-request cost, not bytes, is most of a round's overhead on a busy SuperLink (docs/benchmarks.md, "Round
overhead"), so fedsilo seals a plain round's message content into one ``ConfigRecord`` holding one ``bytes``
value: the whole RecordDict in Flower's own protobuf encoding (``flwr.common.serde.recorddict_to_proto``;
protobuf is made to be parsed from untrusted input, and nothing here is pickle). A message is then three
objects: the message, its RecordDict and the envelope.

Only contents up to :data:`MAX_SEALED_BYTES` are sealed: that is below Flower's 5 MiB array chunk size, so a
sealed model would have travelled as one chunk anyway, while a larger one keeps Flower's chunked, de-duplicated
transfer (the same model sent to every silo is then pushed once). The receiver opens an envelope with
:func:`open_content`, which refuses anything but exactly one envelope of at most that size holding the records the
protocol sends that way (``P.RECORDS_TO_SILO``, ``P.RECORDS_FROM_SILO``), each of its kind and of bounded item counts, and
passes an unsealed content through unchanged: a SecAgg+ message is never sealed (Flower's ``secaggplus_mod`` reads its
records directly). The envelope is transport only: both sides check the opened records as before.
"""

from __future__ import annotations

from fedsilo import protocol as P

#: Largest serialized content that is sealed (and the largest envelope a receiver opens): 4 MiB.
MAX_SEALED_BYTES = 4 << 20
#: What a receiver opens, checked on the parsed protobuf before any Flower record is built: the protocol's records for
#: that direction (``P.RECORDS_TO_SILO``, ``P.RECORDS_FROM_SILO``), each of its kind, at most this many items per
#: record and values per list (the protocol's largest list, a consistency proof, holds a few dozen hashes). Without
#: them a 4 MiB envelope of a million empty items would be one request for its sender but seconds of CPU and hundreds
#: of MB for the single-threaded round loop that opens it.
MAX_ITEMS = 64
MAX_LIST = 4096


class EnvelopeError(ValueError):
    """A sealed content that cannot be opened; the message says what is wrong, without echoing its bytes."""


def seal(content):
    """``content`` (a RecordDict) as one envelope record, or ``content`` itself when it is too large to seal."""
    from flwr.app import ConfigRecord, RecordDict
    from flwr.common.serde import recorddict_to_proto

    if is_sealed(content):
        raise EnvelopeError("the content is already sealed")
    if _array_bytes(content) > MAX_SEALED_BYTES:  # skip the serialization a large model would not use
        return content
    blob = recorddict_to_proto(content).SerializeToString()
    if len(blob) > MAX_SEALED_BYTES:
        return content
    return RecordDict({P.ENVELOPE: ConfigRecord({P.ENVELOPE: blob})})


def is_sealed(content) -> bool:
    return P.ENVELOPE in content


def open_content(content, allowed: dict[str, str]):
    """The records a sealed ``content`` carries, or ``content`` unchanged when it is not sealed. ``allowed``: the
    record names the receiver accepts and the kind of each (``P.RECORDS_TO_SILO`` or ``P.RECORDS_FROM_SILO``)."""
    from flwr.app import ConfigRecord
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    if not is_sealed(content):
        return content
    if len(content) != 1:
        raise EnvelopeError(f"a sealed message carries {len(content) - 1} record(s) beside its envelope")
    record = content[P.ENVELOPE]
    if not isinstance(record, ConfigRecord) or list(record.keys()) != [P.ENVELOPE] or not isinstance(record[P.ENVELOPE], bytes):
        raise EnvelopeError("the envelope must be one ConfigRecord holding one bytes value")
    blob = record[P.ENVELOPE]
    if len(blob) > MAX_SEALED_BYTES:
        raise EnvelopeError(f"the envelope is {len(blob)} bytes, more than the {MAX_SEALED_BYTES} allowed")
    proto = ProtoRecordDict()
    try:
        proto.ParseFromString(blob)
    except Exception as exc:  # noqa: BLE001 - DecodeError, or whatever else the parser raises on crafted bytes
        raise EnvelopeError(f"the envelope does not decode as Flower records ({type(exc).__name__})") from None
    _check_shape(proto, allowed)
    try:
        return recorddict_from_proto(proto)
    except Exception as exc:  # noqa: BLE001 - whatever a crafted value provokes in Flower's decoder is one refusal
        raise EnvelopeError(f"the envelope does not decode as Flower records ({type(exc).__name__})") from None


def _check_shape(proto, allowed: dict[str, str]) -> None:
    """Names, kinds and sizes of the parsed records (``P.RECORDS_TO_SILO``, ``P.RECORDS_FROM_SILO``), before Flower builds them."""
    names = [item.key for item in proto.items]
    if len(set(names)) != len(names):
        raise EnvelopeError("the envelope names a record twice")
    for item in proto.items:
        kind = item.WhichOneof("value")
        if item.key not in allowed:
            raise EnvelopeError(f"the envelope carries a record this side does not accept ({item.key[:40]!r})"
                                if item.key != P.ENVELOPE else "an envelope inside an envelope")
        if kind != allowed[item.key]:
            raise EnvelopeError(f"record '{item.key}' is a {kind or 'record of no kind'}, not a {allowed[item.key]}")
        record = getattr(item, kind)
        if len(record.items) > MAX_ITEMS:
            raise EnvelopeError(f"record '{item.key}' holds {len(record.items)} items, at most {MAX_ITEMS} are accepted")
        keys = [entry.key for entry in record.items]
        if len(set(keys)) != len(keys):
            raise EnvelopeError(f"record '{item.key}' names an item twice")
        for entry in record.items:
            if kind == "array_record":
                continue  # an Array is its bytes (bounded by the envelope) and a shape the receiver's checks read
            field = entry.value.WhichOneof("value")
            if field is None:
                raise EnvelopeError(f"record '{item.key}' has an item with no value")
            if field.endswith("_list") and len(getattr(entry.value, field).vals) > MAX_LIST:
                raise EnvelopeError(f"record '{item.key}' has a list of more than {MAX_LIST} values")


def _array_bytes(content) -> int:
    from flwr.app import ArrayRecord

    return sum(len(array.data) for record in content.values() if isinstance(record, ArrayRecord) for array in record.values())
