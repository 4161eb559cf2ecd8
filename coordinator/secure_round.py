"""One training round through Flower's SecAgg+: the coordinator learns only the silos' weighted mean.

Protocol: SecAgg+ (Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic Overhead",
CCS), the sparse-graph descendant of SecAgg (Bonawitz et al. 2017, CCS), as Flower implements it in
``SecAggPlusWorkflow`` (legacy API). This module runs the workflow's four stages (setup, share keys,
collect masked vectors, unmask) itself, one after the other, so that it can audit who took part in each
and which silos dropped, and it adapts the workflow to fedsilo's round driver:

- a small legacy Strategy hands the workflow each silo's instructions (the global model, in sorted
  tensor-name order, and the plan with its signature) and keeps the unmasked aggregate it is given;
- the workflow talks to the silos through :class:`_RoundGrid`, which uses the round driver's polling
  (fedsilo's tuned interval, the plan's round timeout) and checks every masked reply's identity, metrics
  and array sizes before the workflow adds it to the sum; a reply that fails is audited and left out,
  so the workflow treats its silo as dropped and cancels its masks with the other silos' key shares.

Parameters (per round, from the number n of silos asked): every silo shares its keys with all others
(``num_shares = n``), any ``n // 2 + 1`` of them can rebuild a dropped silo's mask (more than half, so
the coordinator cannot both rebuild a silo's pairwise masks and learn its private mask); each entry is
clipped to ``±update_norm_bound`` (never binding: the silo clips its whole update to that L2 norm) and
quantized to ``quantization_range`` levels, chosen so that the sum of n quantized vectors stays below
the 2**32 modulus; weights are example counts, capped at :data:`MAX_WEIGHT`.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compliance import EventType
from coordinator.validation import Expectation, UpdateRejected, check_identity_and_metrics, global_l2_norm
from fedsilo import protocol as P
from fedsilo.errors import FedsiloError
from fedsilo.secagg_prg import install as _install_secure_prg
from pipelines.serialization import read_npy, state_digest

_install_secure_prg()  # masks from AES-256-CTR, as the silos draw them (fedsilo.secagg_prg)

#: A silo's weight in the mean is its example count, capped here (the masked sum of weights must not overflow).
MAX_WEIGHT = 10_000
MODULUS_RANGE = 2**32
#: Flower's stochastic rounding goes through int32: no quantized entry may reach 2**31.
MAX_QUANTIZATION_RANGE = 2**30
STAGES = ("setup", "share-keys", "collect-masked-vectors", "unmask")
#: How often a round starts the protocol again after silos dropped before training.
MAX_RESTARTS = 2
NPY_HEADER_MAX = 4096


def secagg_parameters(n: int, bound: float) -> dict[str, Any]:
    """SecAgg+ settings for ``n`` silos whose updates have L2 norm at most ``bound`` (see the module docstring)."""
    if n < 3:
        raise FedsiloError(f"secure aggregation needs at least 3 silos, {n} connected",
                           fix="start more silos; with two, each could read the other's update from the sum")
    levels = MODULUS_RANGE
    while levels * n >= MODULUS_RANGE:  # n quantized vectors, each entry < levels, must sum below the modulus
        levels //= 2
    return {"num_shares": n, "reconstruction_threshold": n // 2 + 1, "clipping_range": float(bound),
            "quantization_range": min(levels, MAX_QUANTIZATION_RANGE), "modulus_range": MODULUS_RANGE, "max_weight": float(MAX_WEIGHT)}


def quantization_error_bound(params: dict[str, Any], weights: list[float]) -> float:
    """The most one entry of the secure weighted mean can differ from the exact one (stochastic rounding).

    Silo i sends ``q_i = round_stoch((w_i / W) * x_i + c) * L / 2c)`` with ``W`` = max_weight, ``c`` the clipping
    range and ``L`` the quantization range: each rounding is off by less than one level, ``2c / L``. The mean
    divides the sum by ``sum_i w_i / W``, so the error is below ``n * (2c / L) / sum_i (w_i / W)``, plus the
    rounding of each weight to ``1 / L`` (relative, far smaller).
    """
    c, levels, w_max = params["clipping_range"], params["quantization_range"], params["max_weight"]
    ratios = [min(w, w_max) / w_max for w in weights]
    step = 2 * c / levels
    return len(weights) * step / sum(ratios) + c * len(weights) / (levels * sum(ratios))


@dataclass
class SecureOutcome:
    """What a secure round yields: the weighted mean of the accepted silos' updates, and who took part."""

    aggregate: dict[str, np.ndarray]
    contributions: dict[int, dict[str, Any]] = field(default_factory=dict)  # node -> site, num_examples, metrics, bytes
    dropped: dict[int, str] = field(default_factory=dict)  # node -> the stage it was last missing from
    rejected: dict[int, str] = field(default_factory=dict)  # node -> reason (audited as update.rejected)
    uplink_bytes: int = 0
    params: dict[str, Any] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)


class _Strategy:
    """The legacy Strategy the workflow calls: instructions out, the unmasked aggregate in."""

    def __init__(self, instructions: list) -> None:
        self.instructions = instructions
        self.aggregate: list[np.ndarray] | None = None

    def configure_fit(self, server_round, parameters, client_manager):  # noqa: ARG002 - the workflow's signature
        return self.instructions

    def aggregate_fit(self, server_round, results, failures):  # noqa: ARG002
        from flwr.common import parameters_to_ndarrays

        if results:
            self.aggregate = parameters_to_ndarrays(results[0][1].parameters)  # every result carries the same aggregate
        return None, {}


class _RoundGrid:
    """The Grid the workflow sees: the round driver's polling, and a check on each masked reply before the sum."""

    def __init__(self, run, reference: dict[str, np.ndarray], expect: Expectation, outcome: SecureOutcome) -> None:
        self.run, self.reference, self.expect, self.outcome = run, reference, expect, outcome
        self.stage = ""

    def __getattr__(self, name: str):
        return getattr(self.run.grid, name)

    def send_and_receive(self, messages, *, timeout: float | None = None) -> list:  # noqa: ARG002 - the plan's timeout rules
        from flwr.common.serde import recorddict_to_proto

        messages = list(messages)
        replies = self.run._send_and_receive(messages, self.run.plan.federation.round_timeout_s, unseal=False)  # never sealed
        kept = []
        for reply in replies:
            if reply.has_error():
                kept.append(reply)
                continue
            size = recorddict_to_proto(reply.content).ByteSize()
            self.outcome.uplink_bytes += size
            if self.stage == "collect-masked-vectors":
                node = self.run._node_of(reply)
                try:
                    self.outcome.contributions[node] = self._check_masked(node, reply.content, size)
                except UpdateRejected as exc:
                    self.outcome.rejected[node] = f"{exc.code}: {exc.message}"
                    continue  # left out of the sum: the workflow cancels this silo's masks as a dropped one's
            kept.append(reply)
        return kept

    def _check_masked(self, node: int, content, size: int) -> dict[str, Any]:
        """Identity (the site whose kit key ``node`` holds, where known; one update per site), metrics, and masked
        arrays of the model's shapes (sizes checked before decoding)."""
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

        site, n, metrics = check_identity_and_metrics(content, self.expect)
        self.run.check_registered(node, site)
        if any(c["site"] == site for other, c in self.outcome.contributions.items() if other != node):
            raise UpdateRejected("duplicate-site", f"node {node}'s reply names {site}, whose masked update this round came from another node")
        configs = content.config_records.get(RECORD_KEY_CONFIGS)
        masked = configs.get(Key.MASKED_PARAMETERS) if configs is not None else None
        shapes = [(1,)] + [self.reference[name].shape for name in sorted(self.reference)]
        if not isinstance(masked, list) or len(masked) != len(shapes):
            raise UpdateRejected("wrong-names", f"masked reply carries {len(masked) if isinstance(masked, list) else 0} vectors, "
                                 f"the model needs {len(shapes)}")
        for blob, shape in zip(masked, shapes):
            if not isinstance(blob, bytes) or len(blob) > int(np.prod(shape)) * 4 + NPY_HEADER_MAX:
                raise UpdateRejected("payload-too-large", "a masked vector is larger than its shape needs")
            try:
                arr = read_npy(blob, max_elements=int(np.prod(shape)))
            except ValueError as exc:
                raise UpdateRejected("bad-payload", f"a masked vector is not a valid .npy array: {exc}") from None
            if arr.shape != shape or arr.dtype != np.dtype("<u4"):
                raise UpdateRejected("wrong-shape", f"a masked vector is {arr.dtype}{list(arr.shape)}, expected uint32 {list(shape)}")
        return {"site": site, "num_examples": n, "weight": min(n, MAX_WEIGHT), "metrics": metrics, "bytes": sum(len(b) for b in masked),
                "message_bytes": size}


def run_secure_round(run, round_: int, nodes: list[int]) -> SecureOutcome:
    """Train at ``nodes`` through SecAgg+; the weighted mean of the accepted updates, or FedsiloError if the protocol halts.

    A silo that drops before training (at setup or share-keys) would leave the others unable to finish (Flower's
    workflow would list it as dropped, and no silo holds shares of a key it never sent): the protocol is started
    again with the silos still there, at most :data:`MAX_RESTARTS` times. Fewer masked vectors than
    ``max(3, min_silos)`` stop the round before anything is unmasked.
    """
    fed = run.plan.federation
    need = max(3, fed.min_silos)
    dropped_early: dict[int, str] = {}
    asked = list(nodes)
    for _attempt in range(MAX_RESTARTS + 1):
        if len(asked) < need:
            break
        outcome, restart_with = _attempt_round(run, round_, asked, need)
        if restart_with is None:
            outcome.dropped = {**dropped_early, **outcome.dropped}
            return outcome
        dropped_early.update({n: outcome.dropped[n] for n in set(asked) - set(restart_with)})
        asked = restart_with
    raise FedsiloError(f"round {round_}: {len(asked)} silo(s) left for secure aggregation after "
                       f"{len(dropped_early)} dropped before training, the plan needs {need}",
                       fix="check the silos' error replies in the audit log (fedsilo audit show) and their logs")


def _attempt_round(run, round_: int, nodes: list[int], need: int) -> tuple[SecureOutcome, list[int] | None]:
    """One run of the protocol over ``nodes``: (outcome, None), or (outcome, survivors) to start again without
    the silos that dropped before training."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.common import FitIns
    from flwr.compat.common.recorddict_compat import arrayrecord_to_parameters
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
    from flwr.server.workflow.constant import Key as WorkflowKey
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow, WorkflowState

    fed = run.plan.federation
    reference = run.global_state
    names = sorted(reference)
    params = secagg_parameters(len(nodes), fed.update_norm_bound)
    outcome = SecureOutcome(aggregate={}, params=params)
    grid = _RoundGrid(run, reference, Expectation(run_id=run.run_id, round=round_), outcome)

    global_record = ArrayRecord({name: Array(np.array(reference[name], order="C")) for name in names})
    config: dict[str, Any] = {P.PLAN_YAML: run.plan_text, P.PLAN_HASH: run.plan_hash, P.RUN_ID: run.run_id, P.ROUND: round_,
                              P.TENSOR_NAMES: json.dumps(names)}
    if run.submission is not None:
        config[P.SUBMISSION] = run.submission.note
        config[P.RESEARCHER_KEY] = run.submission.researcher_key
    parameters = arrayrecord_to_parameters(global_record, keep_input=True)
    strategy = _Strategy([(GridClientProxy(node, grid, 0), FitIns(parameters, dict(config))) for node in nodes])
    state = RecordDict({MAIN_CONFIGS_RECORD: ConfigRecord({WorkflowKey.CURRENT_ROUND: round_}), MAIN_PARAMS_RECORD: global_record})
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=state, run_config={}), strategy=strategy,  # type: ignore[arg-type]
                            client_manager=SimpleClientManager())
    workflow = SecAggPlusWorkflow(params["num_shares"], params["reconstruction_threshold"], max_weight=params["max_weight"],
                                  clipping_range=params["clipping_range"], quantization_range=params["quantization_range"],
                                  modulus_range=params["modulus_range"])
    wf_state = WorkflowState()
    steps = (workflow.setup_stage, workflow.share_keys_stage, workflow.collect_masked_vectors_stage, workflow.unmask_stage)
    summed: set[int] = set()
    for stage, step in zip(STAGES, steps):
        grid.stage = stage
        started = time.perf_counter()
        before = set(wf_state.active_node_ids) if wf_state.active_node_ids else set(nodes)
        try:
            ok = step(grid, context, wf_state)
        except FedsiloError:
            raise
        except Exception as exc:  # noqa: BLE001 - Flower's workflow on a malformed reply: the round fails, named and audited
            raise FedsiloError(f"round {round_}: secure aggregation failed at stage {stage} ({type(exc).__name__}: {str(exc)[:120]})",
                               fix="check the silos' replies and logs; a silo sending malformed protocol messages may be faulty") from None
        outcome.stage_seconds[stage] = round(time.perf_counter() - started, 3)
        for node in before - set(wf_state.active_node_ids):
            outcome.dropped.setdefault(node, stage)
        if stage == "share-keys" and set(wf_state.active_node_ids) != set(nodes):
            return outcome, sorted(wf_state.active_node_ids)  # no one has trained yet: start again without them
        if stage == "collect-masked-vectors":  # whose masked vectors are in the sum (a later dropout's mask is rebuilt)
            summed = set(wf_state.active_node_ids)
            if ok and len(summed) < need:  # too few to unmask: the sum of so few would say too much about each
                raise FedsiloError(f"round {round_}: {len(summed)} masked update(s) of {len(nodes)} silo(s), the plan needs {need}; "
                                   "nothing was unmasked", fix="check the silos' error replies in the audit log (fedsilo audit show)")
        if not ok:
            raise FedsiloError(f"round {round_}: secure aggregation halted at stage {stage}: {len(wf_state.active_node_ids)} of {len(nodes)} "
                               f"silo(s) still active, {params['reconstruction_threshold']} needed to remove the masks",
                               fix="check the silos' error replies in the audit log (fedsilo audit show) and their logs")
    if strategy.aggregate is None or len(strategy.aggregate) != len(names):
        raise FedsiloError(f"round {round_}: secure aggregation returned no aggregate", fix="check the coordinator's log")
    outcome.aggregate = {name: np.asarray(arr).reshape(reference[name].shape).astype(reference[name].dtype)
                         for name, arr in zip(names, strategy.aggregate)}
    outcome.dropped = {node: stage for node, stage in outcome.dropped.items() if node not in summed}
    outcome.contributions = {node: c for node, c in outcome.contributions.items() if node in summed}
    _check_aggregate(outcome, round_, fed.update_norm_bound)
    return outcome, None


def _check_aggregate(outcome: SecureOutcome, round_: int, bound: float) -> None:
    """The unmasked mean of updates clipped to ``bound`` has norm at most ``bound`` (plus quantization): anything
    else means a silo sent more than a clipped update, or the two sides' masks did not cancel."""
    for name, arr in outcome.aggregate.items():
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
            raise FedsiloError(f"round {round_}: the secure aggregate's tensor '{name}' is not finite", fix="check the silos' logs")
    weights = [float(c["num_examples"]) for c in outcome.contributions.values()] or [1.0]
    entries = sum(int(a.size) for a in outcome.aggregate.values())
    limit = bound + quantization_error_bound(outcome.params, weights) * math.sqrt(entries)
    norm = global_l2_norm(outcome.aggregate)
    if norm > limit:
        raise FedsiloError(f"round {round_}: the secure aggregate's L2 norm {norm:.4g} exceeds the bound {limit:.4g} that a mean of "
                           "clipped updates respects; it is not applied", fix="a silo sent a malformed masked update: check the silos' logs")


def audit_secure_round(run, round_: int, outcome: SecureOutcome, node_site: dict[int, str]) -> None:
    """Per round: each masked contribution (no digest: the coordinator never sees the update), each dropped or
    rejected silo, and the aggregate (who took part, who dropped, the protocol's settings, the unmasked mean's hash)."""
    for node, c in sorted(outcome.contributions.items()):
        run.audit.append(EventType.UPDATE_RECEIVED, actor=run.actor, object={"type": "update", "id": f"{c['site']}/{round_}", "sha256": None},
                         run_id=run.run_id, round=round_,
                         details={"site": c["site"], "node": str(node), "masked": True, "bytes": c["bytes"], "num_examples": c["num_examples"],
                                  "weight": c["weight"], "epsilon": c["metrics"].get("epsilon")})
    for node, reason in sorted(outcome.rejected.items()):
        run.audit.append(EventType.UPDATE_REJECTED, actor=run.actor, object={"type": "node", "id": str(node), "sha256": None},
                         run_id=run.run_id, round=round_, outcome="denied", reason=reason[:300], details={"site": node_site.get(node), "masked": True})
    for node, stage in sorted(outcome.dropped.items()):
        if node not in outcome.rejected:
            run.audit.append(EventType.UPDATE_MISSING, actor=run.actor, object={"type": "node", "id": str(node), "sha256": None},
                             run_id=run.run_id, round=round_, outcome="failure", reason=f"dropped out of secure aggregation at stage {stage}",
                             details={"site": node_site.get(node), "stage": stage})
