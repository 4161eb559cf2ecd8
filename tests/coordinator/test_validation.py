"""Reply validation on real Flower records: each defect has its own reason code."""

import json
import struct

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from coordinator.validation import Expectation, UpdateRejected, global_l2_norm, validate_reply
from fedsilo import protocol as P
from fedsilo.wire import PACKED_KEY, STYPE, blob_of, pack

REF = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}


def reply(arrays=None, metrics=None, site="hospital0"):
    arrays = {k: v + 1 for k, v in REF.items()} if arrays is None else arrays
    return RecordDict({
        P.ARRAYS: pack(arrays),
        P.METRICS: MetricRecord({P.NUM_EXAMPLES: 10, "epsilon": 1.0} if metrics is None else metrics),
        P.IDENTITY: ConfigRecord({P.SITE: site}),
    })


def test_valid_reply():
    update = validate_reply(7, reply(), REF)
    assert update.site == "hospital0" and update.num_examples == 10 and update.delta["w"].sum() == 6


@pytest.mark.parametrize("content, code", [
    (reply(arrays={"w": REF["w"]}), "wrong-names"),
    (reply(arrays={"w": np.zeros((3, 2), np.float32), "b": REF["b"]}), "wrong-shape"),
    (reply(arrays={"w": REF["w"].astype(np.float64), "b": REF["b"]}), "wrong-dtype"),
    (reply(arrays={"w": np.full((2, 3), np.nan, np.float32), "b": REF["b"]}), "non-finite"),
    (reply(arrays={"w": np.full((2, 3), np.inf, np.float32), "b": REF["b"]}), "non-finite"),
    (reply(metrics={P.NUM_EXAMPLES: 0}), "bad-num-examples"),
    (reply(metrics={P.NUM_EXAMPLES: 10**9}), "bad-num-examples"),
    (reply(metrics={"epsilon": 1.0}), "bad-num-examples"),
    (reply(site="DROP TABLE"), "bad-identity"),
    (RecordDict({P.METRICS: MetricRecord({P.NUM_EXAMPLES: 1})}), "missing-record"),
])
def test_defects_rejected_with_their_code(content, code):
    with pytest.raises(UpdateRejected) as err:
        validate_reply(1, content, REF)
    assert err.value.code == code


def identified(run_id="run-1", round_=3, **kw):
    content = reply(**kw)
    content[P.IDENTITY] = ConfigRecord({P.SITE: "hospital0", P.RUN_ID: run_id, P.ROUND: round_})
    return content


EXPECT = Expectation(run_id="run-1", round=3)


@pytest.mark.parametrize("content, code", [
    (identified(run_id="run-0"), "wrong-run"),
    (reply(), "wrong-run"),  # no run id at all
    (identified(round_=2), "wrong-round"),  # replayed from the previous round
    (identified(round_=True), "wrong-round"),
    (identified(metrics={P.NUM_EXAMPLES: 1, **{f"m{i}": 0.0 for i in range(70)}}), "too-many-metrics"),
])
def test_replies_must_answer_this_run_and_round(content, code):
    assert validate_reply(1, identified(), REF, EXPECT).site == "hospital0"
    with pytest.raises(UpdateRejected) as err:
        validate_reply(1, content, REF, EXPECT)
    assert err.value.code == code


def _with_blob(blob: bytes, stype: str = STYPE):
    content = identified()
    content[P.ARRAYS] = ArrayRecord({PACKED_KEY: Array(dtype="uint8", shape=(len(blob),), stype=stype, data=blob)})
    return content


def _blob(header: dict, data: bytes, pad: bytes = b"") -> bytes:
    text = json.dumps(header).encode() + pad
    return struct.pack("<Q", len(text)) + text + data


def test_an_oversized_payload_is_refused_before_it_is_decoded():
    big = blob_of(pack({"w": np.zeros(100_000, np.float32), "b": REF["b"]}))
    with pytest.raises(UpdateRejected) as err:
        validate_reply(1, _with_blob(big), REF, EXPECT)
    assert err.value.code == "payload-too-large"


@pytest.mark.parametrize("blob, code", [
    # a header that claims a small shape for a big tensor: its offsets do not match the shape
    (_blob({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 400]}, "b": {"dtype": "F32", "shape": [3], "data_offsets": [400, 412]}},
           bytes(412)), "bad-payload"),
    # overlapping tensors (the same bytes read twice)
    (_blob({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, "b": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}},
           bytes(24)), "bad-payload"),
    # free text beside the tensors
    (_blob({"__metadata__": {"note": "DOE^JANE"}, "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "F32", "shape": [3], "data_offsets": [24, 36]}}, bytes(36)), "bad-payload"),
    # trailing bytes after the last tensor
    (_blob({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, "b": {"dtype": "F32", "shape": [3], "data_offsets": [24, 36]}},
           bytes(40)), "bad-payload"),
    (b"\xff" * 8 + b"{}", "bad-payload"),  # a header length past the blob
    # a dtype that is not a string (a TypeError in a naive lookup: must not end the run)
    (_blob({"w": {"dtype": ["F32"], "shape": [2, 3], "data_offsets": [0, 24]}, "b": {"dtype": "F32", "shape": [3], "data_offsets": [24, 36]}},
           bytes(36)), "bad-payload"),
    # a consistent header with whitespace after it: not the canonical encoding of its tensors
    (_blob({"b": {"dtype": "F32", "shape": [3], "data_offsets": [0, 12]}, "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [12, 36]}},
           bytes(36), pad=b"   "), "bad-payload"),
    (struct.pack("<Q", 3) + b"[1]", "bad-payload"),  # not an object
    # a header that is fine, but names a tensor the model does not have
    (_blob({"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, "x": {"dtype": "F32", "shape": [3], "data_offsets": [24, 36]}},
           bytes(36)), "wrong-names"),
])
def test_a_malformed_blob_is_refused_by_its_header(blob, code):
    with pytest.raises(UpdateRejected) as err:
        validate_reply(1, _with_blob(blob), REF, EXPECT)
    assert err.value.code == code


def test_tensors_not_packed_as_one_safetensors_array_are_refused():
    content = identified()
    content[P.ARRAYS] = ArrayRecord({k: Array(v + 1) for k, v in REF.items()})  # Flower's own one-Array-per-tensor form
    with pytest.raises(UpdateRejected) as err:
        validate_reply(1, content, REF, EXPECT)
    assert err.value.code == "bad-payload"


def test_a_pickled_payload_is_never_unpickled():
    import io
    import pickle

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    buf = io.BytesIO()
    np.save(buf, np.array([Boom()], dtype=object), allow_pickle=True)
    assert b"exec" in buf.getvalue() and pickle.PROTO in buf.getvalue()  # a real pickle inside
    for stype in ("numpy.ndarray", STYPE):  # as Flower's own array type, and as if it were a packed blob
        with pytest.raises(UpdateRejected) as err:
            validate_reply(1, _with_blob(buf.getvalue(), stype), REF, EXPECT)
        assert err.value.code == "bad-payload"


def test_norm_bound_rejects_or_clips():
    big = {k: np.full(v.shape, 10.0, np.float32) for k, v in REF.items()}  # norm 10 * 3 = 30
    with pytest.raises(UpdateRejected) as err:
        validate_reply(1, identified(arrays=big), REF, Expectation("run-1", 3, norm_bound=5.0))
    assert err.value.code == "norm-too-large" and "30" in err.value.message
    update = validate_reply(1, identified(arrays=big), REF, Expectation("run-1", 3, norm_bound=5.0, norm_action="clip"))
    assert update.clipped and update.l2_norm == pytest.approx(30.0)
    assert global_l2_norm(update.delta) == pytest.approx(5.0, rel=1e-6)
    assert update.delta["w"].dtype == np.float32
    within = validate_reply(1, identified(arrays=big), REF, Expectation("run-1", 3, norm_bound=31.0))
    assert not within.clipped and within.delta["w"][0, 0] == 10.0
