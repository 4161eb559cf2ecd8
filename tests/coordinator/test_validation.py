"""Reply validation on real Flower records: each defect has its own reason code."""

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from coordinator.validation import UpdateRejected, validate_reply
from fedsilo import protocol as P

REF = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32)}


def reply(arrays=None, metrics=None, site="hospital0"):
    arrays = {k: v + 1 for k, v in REF.items()} if arrays is None else arrays
    return RecordDict({
        P.ARRAYS: ArrayRecord({k: Array(v) for k, v in arrays.items()}),
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
