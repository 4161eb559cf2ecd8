"""SecAgg+ at the silo: Flower's ``secaggplus_mod`` around the silo's own train handler.

Secure aggregation (Bonawitz et al. 2017, "Practical Secure Aggregation for Privacy-Preserving Machine
Learning", CCS; SecAgg+: Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic
Overhead", CCS) lets the coordinator learn only the weighted sum of the silos' updates. Flower ships it
in its legacy API: the coordinator's ``SecAggPlusWorkflow`` runs four stages (setup, share keys, collect
masked vectors, unmask) and speaks in FitIns/FitRes records. This mod

- routes the protocol's messages (they carry Flower's ``secaggplus_configs`` record) through Flower's
  ``secaggplus_mod`` and leaves every other message to the handler untouched;
- in the stage that trains, translates Flower's FitIns into the silo's own records, runs the same train
  handler as a plain round (plan checks, approvals, privacy budget, DP-SGD, ledger, egress guard), with
  :data:`SECURE_CHANNEL` set so the handler knows the update will be masked (and clips it to the plan's
  norm bound), and translates the reply into FitRes for Flower to quantize and mask;
- sends the masked vectors as uint32 instead of Flower's int64: the masks live modulo 2**32 (the
  workflow's default ``modulus_range``), so uint32 arithmetic at the coordinator wraps exactly as the
  protocol needs, and the upload is the size of a float32 update instead of twice it.

A refusal (unapproved plan, spent budget) answers the stage with the handler's own error reply; the
coordinator then treats the silo as dropped and removes its masks with the other silos' key shares. A
setup whose settings would not protect the silo's update (fewer than 3 silos, a threshold of at most
half the shares) is refused before any key is made.
"""

from __future__ import annotations

import json
from contextvars import ContextVar

import numpy as np
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key

from fedsilo import protocol as P
from fedsilo.secagg_prg import install as _install_secure_prg

_install_secure_prg()  # masks from AES-256-CTR, not Flower's 32-bit-seeded generator (fedsilo.secagg_prg)

#: True while the train handler runs inside the SecAgg+ collect stage: its reply will be masked.
SECURE_CHANNEL: ContextVar[bool] = ContextVar("fedsilo_secure_channel", default=False)
#: Records a masked reply may carry (Flower's FitRes records, emptied of parameters, and the silo's own).
SECURE_REPLY_RECORDS = frozenset({"fitres.parameters", "fitres.num_examples", "fitres.metrics", "fitres.status", RECORD_KEY_CONFIGS,
                                  P.METRICS, P.IDENTITY})
UINT32_RANGE = 2**32


class _Refused(Exception):
    def __init__(self, reply: Message) -> None:
        self.reply = reply


def secure_aggregation_mod(msg: Message, ctxt: Context, call_next) -> Message:
    """Run SecAgg+ for the protocol's messages; pass every other message to ``call_next`` unchanged."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, ctxt)

    def train(fit_msg: Message, context: Context) -> Message:
        fit_msg.content = _native_content(fit_msg.content)
        token = SECURE_CHANNEL.set(True)
        try:
            reply = call_next(fit_msg, context)
        finally:
            SECURE_CHANNEL.reset(token)
        if reply.has_error():
            raise _Refused(reply)
        return Message(_fitres_content(reply.content, _max_weight(context)), reply_to=fit_msg)

    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    problem = _weak_setup(configs) or _inconsistent_stage(configs, ctxt)
    if problem:
        return Message(Error(P.ERR_REFUSED, f"secure aggregation refused: {problem}"), reply_to=msg)
    try:
        out = secaggplus_mod(msg, ctxt, train)
    except _Refused as refused:
        return Message(refused.reply.error, reply_to=msg)
    except Exception as exc:  # noqa: BLE001 - Flower's protocol checks and crypto errors (stage order, key lists, a bad
        # share's InvalidToken) hold no data: the silo answers with their kind rather than crash its ClientApp
        return Message(Error(P.ERR_REFUSED, f"secure aggregation aborted: {type(exc).__name__}: {str(exc)[:200]}"), reply_to=msg)
    if out.has_content():
        from fedsilo.errors import RefusalError

        _masked_as_uint32(out.content, ctxt)
        try:
            check_secure_reply(out.content)
        except RefusalError as exc:
            return Message(Error(P.ERR_REFUSED, exc.one_line()), reply_to=msg)
    return out


def _weak_setup(configs: ConfigRecord) -> str:
    """Why a setup stage's settings would not protect this silo's update ("" when they do).

    The silo does not take the coordinator's word for them: with two parties, or a reconstruction threshold
    of at most half the shares, a coordinator could learn one silo's update (from the sum, or by asking some
    neighbours for its mask seed and others for its key as though it had dropped; Bell et al. 2020, Sec. 3).
    """
    from flwr.common.secure_aggregation.secaggplus_constants import Stage

    if configs.get(Key.STAGE) != Stage.SETUP:
        return ""
    samples, shares, threshold = (configs.get(k) for k in (Key.SAMPLE_NUMBER, Key.SHARE_NUMBER, Key.THRESHOLD))
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (samples, shares, threshold)):
        return "the setup lacks the number of silos, shares or the threshold"
    if samples < 3:
        return f"{samples} silo(s) in the sum: each could read the other's update"
    if 2 * threshold <= shares:
        return f"reconstruction threshold {threshold} of {shares} shares is not more than half"
    return ""


def _inconsistent_stage(configs: ConfigRecord, ctxt: Context) -> str:
    """Why a later stage's request could isolate this silo's update ("" when it cannot).

    Flower's mod trusts the coordinator's lists. A coordinator that named a silo both active and dropped at
    the unmask stage would collect shares of both its mask seed and its key, and unmask its update alone;
    one that forwarded only some of the neighbours' key shares could later call the rest dropped. So this
    silo requires every neighbour it shared keys with at each stage, and disjoint active and dropped lists
    naming only those neighbours (the coordinator restarts the setup when a silo drops before training).
    """
    from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
    from flwr.common.secure_aggregation.secaggplus_constants import Stage

    stage = configs.get(Key.STAGE)
    if stage == Stage.SETUP or RECORD_KEY_STATE not in ctxt.state.config_records:
        return ""
    state = SecAggPlusState(**ctxt.state.config_records[RECORD_KEY_STATE])
    if stage == Stage.SHARE_KEYS:
        keys = [k for k in configs.keys() if k != Key.STAGE]
        if len(keys) != state.share_num or len(keys) < 3:
            return f"{len(keys)} public keys forwarded, the setup announced {state.share_num} (at least 3)"
        return ""
    neighbours = set(state.public_keys_dict) - {state.nid}
    if stage == Stage.COLLECT_MASKED_VECTORS:
        sources = configs.get(Key.SOURCE_LIST)
        if not isinstance(sources, list) or set(sources) != neighbours or len(sources) != len(neighbours):
            return "the key shares forwarded are not exactly those of the silos that shared keys with this one"
        return ""
    if stage == Stage.UNMASK:
        active, dead = configs.get(Key.ACTIVE_NODE_ID_LIST), configs.get(Key.DEAD_NODE_ID_LIST)
        if not isinstance(active, list) or not isinstance(dead, list):
            return "the unmask request lacks its lists"
        known = neighbours | {state.nid}
        if set(active) & set(dead) or state.nid in dead or not set(active) | set(dead) <= known or len(set(active)) != len(active):
            return "the unmask request names a silo both active and dropped, this silo as dropped, or an unknown silo"
    return ""


def _native_content(content: RecordDict) -> RecordDict:
    """Flower's FitIns records -> the silo's own: the global model by name (packed, fedsilo.wire), and the plan's config.

    Each tensor arrives as Flower's .npy bytes from the coordinator: read with the header checked before anything
    is allocated (no more entries than the payload has bytes); the train handler then bounds the packed model by
    the plan's network."""
    from fedsilo.wire import pack
    from pipelines.serialization import read_npy

    if "fitins.config" not in content or "fitins.parameters" not in content:
        raise KeyError("the secure round's train message lacks Flower's fitins records")
    config = dict(content["fitins.config"])
    names = json.loads(str(config.pop(P.TENSOR_NAMES, "[]")))
    arrays = content["fitins.parameters"]
    if not isinstance(names, list) or len(names) != len(arrays) or len(set(names)) != len(names):
        raise ValueError("the secure round's global model does not match its tensor names")
    state = {}
    for name, key in zip(names, sorted(arrays.keys(), key=int)):
        data = bytes(arrays[key].data)
        state[str(name)] = read_npy(data, max_elements=len(data))
    return RecordDict({P.ARRAYS: pack(state), P.CONFIG: ConfigRecord(config)})


def _fitres_content(content: RecordDict, max_weight: float) -> RecordDict:
    """The handler's reply -> Flower's FitRes records (update in sorted-name order), keeping the silo's metrics and identity.

    The weight is the silo's example count, capped at the workflow's ``max_weight`` (above it the masked sum could overflow).
    """
    from flwr.common import Code, FitRes, Parameters, Status, ndarray_to_bytes
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    from fedsilo.wire import unpack_record

    arrays = unpack_record(content[P.ARRAYS])  # the silo's own reply, already through the egress guard
    # float64: Flower scales and quantizes in the parameters' own dtype, and float32's 24-bit mantissa would
    # round away most of the 2**29 or 2**30 levels (this copy stays at the silo; only the masked integers leave).
    tensors = [ndarray_to_bytes(arrays[name].astype(np.float64)) for name in sorted(arrays)]
    num_examples = int(content[P.METRICS][P.NUM_EXAMPLES])
    weight = min(num_examples, int(max_weight)) if max_weight > 0 else num_examples
    fitres = FitRes(status=Status(code=Code.OK, message=""), parameters=Parameters(tensors=tensors, tensor_type="numpy.ndarray"),
                    num_examples=weight, metrics={})
    out = fitres_to_recorddict(fitres, keep_input=False)
    out[P.METRICS] = content[P.METRICS]
    out[P.IDENTITY] = content[P.IDENTITY]
    return out


def _max_weight(context: Context) -> float:
    state = context.state.config_records.get(RECORD_KEY_STATE)
    return float(state.get("max_weight", 0.0)) if state is not None else 0.0


def _masked_as_uint32(content: RecordDict, ctxt: Context) -> None:
    """Flower's masked vectors (int64 .npy, values in [0, modulus_range)) re-encoded as uint32 .npy."""
    from flwr.common import bytes_to_ndarray, ndarray_to_bytes

    configs = content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is None or Key.MASKED_PARAMETERS not in configs:
        return
    mod_range = int(ctxt.state.config_records[RECORD_KEY_STATE].get("mod_range", 0))
    if not 0 < mod_range <= UINT32_RANGE:
        return  # a wider modulus would not fit: leave Flower's encoding
    masked = [bytes_to_ndarray(b) for b in configs[Key.MASKED_PARAMETERS]]
    configs[Key.MASKED_PARAMETERS] = [ndarray_to_bytes(np.asarray(a).astype(np.uint32)) for a in masked]


def check_secure_reply(content: RecordDict) -> None:
    """The egress guard for a masked reply: only Flower's protocol records and the silo's metrics and identity,
    and no parameters in the clear."""
    from fedsilo.errors import RefusalError

    names = set(content.keys())
    if not names <= SECURE_REPLY_RECORDS:
        raise RefusalError(f"egress blocked: a secure reply carries unexpected records {sorted(names - SECURE_REPLY_RECORDS)}")
    if "fitres.parameters" in content and len(content["fitres.parameters"]) > 0:
        raise RefusalError("egress blocked: a secure reply carries parameters in the clear")
