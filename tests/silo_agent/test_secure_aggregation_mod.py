"""The silo's SecAgg+ mod does not take the coordinator's word: requests that could isolate its update are refused.

Three silos run Flower's real setup and share-keys stages in-process (keys, Shamir shares, encryption); the
coordinator's side is played by hand, as a dishonest coordinator would play it.
"""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedsilo import protocol as P
from silo_agent.secure_aggregation import secure_aggregation_mod
from test_client_app import serverapp_identity  # noqa: F401 - fixture

NODES = (11, 12, 13)


def _send(configs: dict, node: int, ctx: Context) -> Message:
    msg = Message(content=RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(configs)}), message_type="train", dst_node_id=node)
    return secure_aggregation_mod(msg, ctx, lambda m, c: pytest.fail("no stage here may reach the train handler"))


@pytest.fixture
def after_share_keys():
    """Three silos through setup and share-keys; returns their contexts and the ciphertexts each sent."""
    contexts = {n: Context(run_id=1, node_id=n, node_config={}, state=RecordDict(), run_config={}) for n in NODES}
    setup = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2, Key.CLIPPING_RANGE: 1.0,
             Key.TARGET_RANGE: 2**20, Key.MOD_RANGE: 2**32, Key.MAX_WEIGHT: 100.0}
    keys = {}
    for n in NODES:
        reply = _send(dict(setup), n, contexts[n])
        assert not reply.has_error(), reply.error.reason
        cfg = reply.content[RECORD_KEY_CONFIGS]
        keys[str(n)] = [cfg[Key.PUBLIC_KEY_1], cfg[Key.PUBLIC_KEY_2]]
    sent = {}
    for n in NODES:
        reply = _send({Key.STAGE: Stage.SHARE_KEYS, **keys}, n, contexts[n])
        assert not reply.has_error(), reply.error.reason
        cfg = reply.content[RECORD_KEY_CONFIGS]
        sent[n] = dict(zip(cfg[Key.DESTINATION_LIST], cfg[Key.CIPHERTEXT_LIST]))
    return contexts, keys, sent


def test_share_keys_with_fewer_keys_than_announced_is_refused():
    ctx = Context(run_id=1, node_id=11, node_config={}, state=RecordDict(), run_config={})
    setup = {Key.STAGE: Stage.SETUP, Key.SAMPLE_NUMBER: 3, Key.SHARE_NUMBER: 3, Key.THRESHOLD: 2, Key.CLIPPING_RANGE: 1.0,
             Key.TARGET_RANGE: 2**20, Key.MOD_RANGE: 2**32, Key.MAX_WEIGHT: 100.0}
    cfg = _send(setup, 11, ctx).content[RECORD_KEY_CONFIGS]
    reply = _send({Key.STAGE: Stage.SHARE_KEYS, "11": [cfg[Key.PUBLIC_KEY_1], cfg[Key.PUBLIC_KEY_2]]}, 11, ctx)
    assert reply.has_error() and reply.error.code == P.ERR_REFUSED and "1 public keys forwarded, the setup announced 3" in reply.error.reason


def test_collect_with_some_neighbours_shares_withheld_is_refused(after_share_keys):
    contexts, _, sent = after_share_keys
    # Node 11 gets only node 12's shares: the coordinator could later call node 13 dropped and isolate 11's update.
    reply = _send({Key.STAGE: Stage.COLLECT_MASKED_VECTORS, Key.CIPHERTEXT_LIST: [sent[12][11]], Key.SOURCE_LIST: [12]}, 11, contexts[11])
    assert reply.has_error() and "not exactly those of the silos that shared keys" in reply.error.reason


@pytest.mark.parametrize("active, dead", [([11, 12, 13], [13]), ([12, 13], [11]), ([11, 12, 99], [])])
def test_unmask_naming_a_silo_both_active_and_dropped_is_refused(after_share_keys, active, dead):
    from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState

    contexts, _, _ = after_share_keys
    ctx = contexts[11]
    # As if the collect stage had run: Flower's mod expects unmask next.
    state = SecAggPlusState(**ctx.state.config_records["secaggplus_state"])
    state.current_stage = Stage.COLLECT_MASKED_VECTORS
    ctx.state.config_records["secaggplus_state"] = ConfigRecord(state.to_dict())
    reply = _send({Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead}, 11, ctx)
    assert reply.has_error() and "both active and dropped, this silo as dropped, or an unknown silo" in reply.error.reason
    # (The honest path, disjoint lists of known silos after a real collect stage, runs in tests/e2e/test_secure_aggregation.py.)
