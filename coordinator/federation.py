"""One federated run, round by round, over a Flower Grid.

The plan's aggregation rule is held by this driver (a wrapper around the rule, not a FedAvg
subclass), so robust rules and audit hooks sit in one place. Per round: send the global weights
and the plan (text and hash) to every connected silo; validate each reply; audit it; aggregate
the valid deltas with the plan's rule; apply them with the server learning rate; write the model,
the run state and metrics.json atomically to the run folder; evaluate the new global model at
every silo on its held-out cases.

Round r's model is evaluated in round r+1's train messages (``P.EVALUATE``): each silo evaluates the
model it receives, which is round r's, then trains from it, and answers both in one reply. A
SuperNode handles one message at a time, and each message is several authenticated requests per
hop through the SuperLink (docs/benchmarks.md, "Round overhead"), so a separate evaluate message
would cost a second exchange per round. The last round's model gets an evaluate message of its own.
A round's row (rounds.jsonl, the ``round`` progress line) is published at the end of its training,
its evaluation (an ``evaluated`` line) once that is in. SecAgg+ rounds evaluate right after their
own multi-stage exchange.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compliance import AuditLog, EventType
from compliance.checkpoint import Signer, VerifierKey, verify_checkpoint
from coordinator.aggregation import rule_for_plan
from coordinator.progress import EVALUATED_IN_ROUND, EVALUATED_WITH_NEXT_ROUND, PROGRESS_PREFIX, ROUNDS_FILE, read_rows
from coordinator.run_state import RunSnapshot, save_snapshot
from coordinator.server_optimizer import build_server_optimizer
from coordinator.validation import Expectation, UpdateRejected, validate_reply
from fedsilo.envelope import EnvelopeError, is_sealed, open_content, seal
from fedsilo import protocol as P
from fedsilo.errors import DeploymentError, FedsiloError, VerificationError
from pipelines.plan import Plan
from pipelines.serialization import save_model, state_digest, state_nbytes

#: Flower's own interval between checks for replies (Grid.send_and_receive).
FLOWER_POLL_S = 3.0
#: The researcher's submission bundle, kept in the run folder so that a resumed run sends the same signature.
SUBMISSION_FILE = "submission.json"
#: At most this many extra consistency proofs per witness request (from checkpoints whose cosignature was lost;
#: about 0.5 kB each).
MAX_OTHER_PROOFS = 32
#: A cosigned checkpoint is a few hundred bytes; a reply's larger one is not read.
MAX_COSIGNED_BYTES = 64 * 1024


@dataclass
class _PendingEvaluation:
    """A finished round whose model is still to be evaluated: at ``nodes`` (None: those connected when it is asked),
    with the round's signed checkpoint ``note`` for the silos to cosign; ``row`` receives the figures."""

    round: int
    nodes: list[int] | None
    note: bytes | None
    row: dict[str, Any]


@dataclass
class RunState:
    """What the run has learned so far; written to metrics.json after each round."""

    plan_hash: str
    run_id: str
    rounds: list[dict[str, Any]] = field(default_factory=list)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False), encoding="utf-8")
    os.replace(tmp, path)


class FederatedRun:
    """Drive ``plan`` over ``grid`` and leave the results in ``out_dir``.

    Args:
        grid: Flower's Grid (deployment or simulation).
        plan: the validated plan; its canonical hash identifies the run's plan everywhere.
        plan_text: the plan as sent to silos (YAML; silos re-hash it).
        out_dir: the run folder (audit/, logs/, model.safetensors, metrics.json, plan.yaml).
        run_id: Flower's run id.
        initial: the initial global model (name -> array), built from the plan.
        signer: the coordinator's checkpoint key; without it the audit log is not signed or witnessed.
        witness_keys: the silos' witness keys, to check their cosignatures before keeping them.
        submission: the researcher's signed submission bundle (without it, silos refuse the plan).
        resume: the run state of an interrupted run (coordinator.run_state): the run continues after its
            last completed round, with that round's global model and server optimizer state.
        flower_run_id: Flower's id of this execution, when it differs from ``run_id`` (a resumed run).
        node_keys: the sites' node public keys (as Flower stores them) -> site, from the coordinator kit
            (``coordinator.pki.load_node_keys``): each node's site is the one its key belongs to, and a node with
            another key is sent nothing.
    """

    def __init__(self, grid, plan: Plan, plan_text: str, out_dir: Path, run_id: str, initial: dict[str, np.ndarray], *,
                 signer: Signer | None = None, witness_keys: Sequence[VerifierKey] = (), submission=None,
                 resume: RunSnapshot | None = None, flower_run_id: str | None = None, node_keys: Mapping[bytes, str] | None = None) -> None:
        self.grid = grid
        self.plan = plan
        self.plan_text = plan_text
        self.plan_hash = plan.hash()
        self.submission = submission  # compliance.statements.SubmissionBundle, or None (silos will refuse)
        self.out_dir = out_dir
        self.run_id = run_id
        self.global_state = initial
        fed = plan.federation
        self.rule = rule_for_plan(fed)
        self.optimizer = build_server_optimizer(fed.server_optimizer.name, fed.server_lr, fed.server_optimizer.args)
        self.state = RunState(plan_hash=self.plan_hash, run_id=run_id)
        self.actor = {"kind": "coordinator", "id": "coordinator", "site": None, "role": "aggregator",
                      "key": signer.fingerprint if signer else None}
        (out_dir / "logs").mkdir(parents=True, exist_ok=True)
        # One origin per run: witnesses keep one history per origin (RFC 9162 log identity).
        self.audit = AuditLog.open(out_dir / "audit", origin=f"fedsilo.coordinator/{run_id}", signer=signer, source="coordinator")
        self.signer = signer
        self.trusted = ([signer.verifier] if signer else []) + list(witness_keys)
        self.node_site: dict[int, str] = {}
        #: The kit's node keys (None without them: the simulation engine, whose nodes have random keys, and
        #: --insecure-dev; a reply's site is then taken as it names itself), and node -> the site whose kit key the
        #: node authenticated with (Flower's node records, ``Grid.get_nodes``): a reply from it must name that site.
        self.node_keys = dict(node_keys) if node_keys is not None else None
        self.kit_site: dict[int, str] = {}
        self.unknown_nodes: set[int] = set()  # nodes whose key is not a kit key: sent nothing, audited once
        self.witnessed_size: dict[str, int] = {}  # site -> size of the last checkpoint it cosigned
        self.checkpoint_size = 0
        self.signed_sizes: list[int] = []  # sizes of the checkpoints signed in this run (a silo may hold any of them)
        self.aggregate_seconds = 0.0
        self.uplink_bytes = 0  # serialized bytes of this round's train replies (all protocol stages)
        self.reply_node: dict[str, int] = {}  # message id -> the node it was sent to
        self.node_seconds: dict[int, float] = {}  # node -> its work on its last train message (the reply's "seconds")
        self.resume = resume
        self.flower_run_id = flower_run_id or run_id
        if resume is not None:
            if resume.plan_hash != self.plan_hash or resume.run_id != run_id:
                raise FedsiloError(f"the run state is of run {resume.run_id[:12]} with plan {resume.plan_hash[:12]}, not this run's",
                                   fix="resume a run with the plan and run folder it started with")
            self.global_state = resume.global_state
            self.optimizer.load_state_dict(resume.optimizer_state)
            self.state.rounds = list(resume.rounds)
            self.node_site = dict(resume.node_site)
            self.witnessed_size = dict(resume.witnessed_size)
            self.signed_sizes = [int(r["details"]["size"]) for r in self.audit.records() if r["event"] == EventType.CHECKPOINT_SIGNED
                                 and r["outcome"] == "success" and isinstance((r.get("details") or {}).get("size"), int)]

    # --- messages ---------------------------------------------------------------------

    def _send(self, nodes: list[int], round_: int, message_type: str, note: bytes | None = None) -> list:
        """Send the global model and the plan to ``nodes`` and collect the replies within the round timeout."""
        return self._send_and_receive(self._messages(nodes, round_, message_type, note), self.plan.federation.round_timeout_s)

    def _messages(self, nodes: list[int], round_: int, message_type: str, note: bytes | None = None,
                  evaluate: _PendingEvaluation | None = None) -> list:
        """The global model and the plan for each of ``nodes``; the model is serialized once for all of them.

        ``note``: a signed checkpoint for each known silo to cosign. ``evaluate``: a finished round whose model (the
        one sent) the silos that trained in it evaluate before they train (``P.EVALUATE``), cosigning its checkpoint.
        """
        from flwr.app import ConfigRecord, Message, RecordDict

        from fedsilo.wire import pack

        arrays = pack(self.global_state)  # one object for the whole model (fedsilo.wire)
        config = ConfigRecord({P.PLAN_YAML: self.plan_text, P.PLAN_HASH: self.plan_hash, P.RUN_ID: self.run_id, P.ROUND: round_})
        if self.submission is not None:
            config[P.SUBMISSION] = self.submission.note
            config[P.RESEARCHER_KEY] = self.submission.researcher_key
        evaluating = set(evaluate.nodes or ()) if evaluate is not None else set()
        messages = []
        for node in nodes:
            content = RecordDict({P.ARRAYS: arrays, P.CONFIG: config})
            cosign = note
            if node in evaluating:
                content[P.EVALUATE] = ConfigRecord({P.ROUND: evaluate.round})
                cosign = evaluate.note
            if cosign is not None and node in self.node_site:
                content[P.WITNESS] = self._witness_request(self.node_site[node], cosign)
            messages.append(Message(content=seal(content), message_type=message_type, dst_node_id=node))  # one object (fedsilo.envelope)
        return messages

    def _send_and_receive(self, messages: list, timeout_s: float, *, unseal: bool = True) -> list:
        """Push ``messages`` and collect the replies that arrive within ``timeout_s``, sealed ones opened
        (fedsilo.envelope) unless ``unseal`` is False (SecAgg+ stages: a sealed reply there stays sealed, and is
        refused as malformed).

        Flower's ``Grid.send_and_receive`` checks for replies every 3 s (this does the same through
        the same public Grid calls); a coordinator started with fedsilo's Flower tuning
        (fedsilo.flower_tuning) checks every tenth of a second instead, and its SuperLink holds a check
        that finds nothing until a reply is pushed (fedsilo.flower_longpoll). A check that found replies
        is followed by another at once: the rest may be in too.
        """
        from fedsilo.flower_tuning import poll_interval

        interval = poll_interval() or FLOWER_POLL_S
        ids = self._push(messages)
        # Flower answers for a node that stopped sending heartbeats itself (an error reply from the
        # SuperLink, whose source is not the node): map every reply back to the node it was sent to.
        self.reply_node.update({mid: m.metadata.dst_node_id for mid, m in zip(ids, messages) if mid})
        pending = {mid for mid in ids if mid}  # a message the SuperLink refused has no id and gets no reply
        replies: list = []
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            got = list(self.grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if pending and not got:  # a SuperLink that holds empty pulls (fedsilo.flower_longpoll) answered "none" after its hold
                time.sleep(interval)
        order = {mid: i for i, mid in enumerate(ids)}  # replies in the order the messages went out: a deterministic aggregation
        sent = dict(zip(ids, messages))
        return sorted((_opened(r, sent) if unseal else r for r in replies), key=lambda r: order.get(r.metadata.reply_to_message_id, len(order)))

    def _push(self, messages: list) -> list:
        """Push ``messages``, the one for the silo expected to work longest in a push of its own ahead of the rest;
        their ids in the order of ``messages`` (so replies, and the aggregation, keep that order).

        A round ends with its slowest silo's reply, and the SuperLink answers one request at a time: pushed together,
        every silo's message (a pull and three object pulls each) is served in the same stretch and the slowest
        silo starts last with the rest. Its message first, it starts training while the others' go out; the longest
        job first is Graham's LPT rule (Graham 1969, "Bounds on multiprocessing timing anomalies"). The expected work
        is the silo's last reported ``seconds``; until a round has reported one (the first), all go in one push.
        A message the SuperLink did not store has ``None`` (or Flower's empty id) in its place."""
        known = [i for i, m in enumerate(messages) if m.metadata.dst_node_id in self.node_seconds]
        if len(messages) < 2 or not known:
            return self._push_batch(messages)
        first = max(known, key=lambda i: self.node_seconds[messages[i].metadata.dst_node_id])
        ahead = self._push_batch([messages[first]])
        rest = self._push_batch(messages[:first] + messages[first + 1:])
        return rest[:first] + ahead + rest[first:]

    def _push_batch(self, batch: list) -> list:
        """Flower's ids for one push, one per message. Flower keeps them in order, with ``None`` or ``""`` for a message
        the SuperLink did not store, but answers ``[]`` for a push refused whole (a request over the SuperLink's size
        limit): that becomes one ``None`` per message, so that the ids of :meth:`_push`'s two pushes stay aligned."""
        ids = list(self.grid.push_messages(batch))
        return ids if len(ids) == len(batch) else [None] * len(batch)

    # --- signed checkpoints, witnessed by the silos -----------------------------------

    def _sign_checkpoint(self, round_: int | None) -> bytes | None:
        """Sign a checkpoint over the whole log, this event's own record included."""
        if self.signer is None:
            return None
        size = len(self.audit) + 1
        self.audit.append(EventType.CHECKPOINT_SIGNED, actor=self.actor, object={"type": "checkpoint", "id": f"{self.audit.origin}/{size}", "sha256": None},
                          run_id=self.run_id, round=round_, details={"size": size, "key": self.signer.name})
        note = self.audit.sign_checkpoint()
        self.checkpoint_size = size
        self.signed_sizes.append(size)
        return note

    def _witness_request(self, site: str, note: bytes):
        """The checkpoint ``note`` for ``site`` to cosign, with the consistency proof from the last size it cosigned.

        A silo may hold a later checkpoint than the coordinator knows: it cosigned one whose reply was lost (the
        ServerApp died with the reply on its way, then resumed from its run state). So the request also carries
        proofs from the sizes of the checkpoints signed since (the latest :data:`MAX_OTHER_PROOFS`);
        the silo uses the one from the size it holds."""
        from flwr.app import ConfigRecord

        old = self.witnessed_size.get(site, 0)
        proof = self.audit.consistency_proof(old, self.checkpoint_size) if old else []
        others = [s for s in self.signed_sizes if old < s < self.checkpoint_size][-MAX_OTHER_PROOFS:]
        return ConfigRecord({P.CHECKPOINT: note, P.PROOF: [bytes(h) for h in proof], P.OLD_SIZE: old,
                             P.OTHER_PROOFS: [s.to_bytes(8, "big") + b"".join(bytes(h) for h in self.audit.consistency_proof(s, self.checkpoint_size))
                                              for s in others]})

    def _keep_cosignature(self, site: str, node: int, cosigned: bytes, round_: int) -> None:
        """Check a silo's cosignature against the witness key provisioned for the site its node is known as (not
        any trusted site's key: a node must not pass another site's cosignature off as its own), then keep it with
        the checkpoint."""
        from compliance.checkpoint import KEY_TYPE_COSIGNATURE
        from coordinator.provision import witness_key_name

        name = witness_key_name(site)
        witness = [k for k in self.trusted if k.key_type == KEY_TYPE_COSIGNATURE and k.name == name]
        log_keys = [self.signer.verifier] if self.signer else []  # this run's checkpoint key, not a retired one
        try:
            if not witness:
                raise VerificationError(f"no witness key '{name}' is trusted here", fix="provision the site's witness key in audit-trust/")
            verified = verify_checkpoint(cosigned, log_keys + witness, origin=self.audit.origin, min_cosignatures=1)
        except VerificationError as exc:
            self.audit.append(EventType.CHECKPOINT_COSIGNED, actor=self.actor, run_id=self.run_id, round=round_, outcome="failure",
                              reason=f"cosignature of {site} does not verify with its witness key: {exc.one_line()}"[:300],
                              details={"site": site, "node": str(node)})
            return
        self.audit.store_cosigned(cosigned)
        self.witnessed_size[site] = verified.checkpoint.size
        self.audit.append(EventType.CHECKPOINT_COSIGNED, actor=self.actor, object={"type": "checkpoint", "id": f"{self.audit.origin}/{verified.checkpoint.size}",
                          "sha256": verified.checkpoint.root.hex()}, run_id=self.run_id, round=round_, details={"site": site, "node": str(node)})

    def _node_of(self, reply) -> int:
        return self.reply_node.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def check_registered(self, node: int, site: str) -> None:
        """Refuse a reply whose site is not the one whose kit key ``node`` authenticated with (an authenticated
        hospital must not pass its update off as another's); without kit keys there is nothing to check against."""
        known = self.kit_site.get(node)
        if self.node_keys is not None and known != site:
            raise UpdateRejected("identity-mismatch", f"node {node} holds the key of {known or 'no site of the kit'}, its reply claims to be {site}")

    def _authenticated(self, node: int) -> str:
        """How a node's site is known, for its node.started record."""
        if node in self.kit_site:
            return "supernode key (Flower node auth), the coordinator kit's key of this site"
        return "supernode key (Flower node auth); site as the reply names it (no site keys given to the coordinator)"

    def _connected_nodes(self) -> list[int]:
        """The SuperLink's nodes for this run. With the kit's node keys, only the nodes holding one, each known as
        that key's site (Flower's node records, ``Grid.get_nodes``: the public key each node authenticated with);
        any other node (a key registered by someone else through the Control API) is sent nothing, audited once."""
        if self.node_keys is None:
            return sorted(int(n) for n in self.grid.get_node_ids())
        nodes = []
        for info in self.grid.get_nodes():
            node, site = int(info.node_id), self.node_keys.get(bytes(info.public_key))
            if site is None:
                if node not in self.unknown_nodes:
                    self.unknown_nodes.add(node)
                    self.audit.append(EventType.NODE_STARTED, actor=self.actor, object={"type": "node", "id": str(node), "sha256": None},
                                      run_id=self.run_id, outcome="denied", reason="its key is none of the coordinator kit's site keys: it is sent nothing",
                                      details={"node": str(node)})
                continue
            self.kit_site[node] = site
            nodes.append(node)
        return sorted(nodes)

    def _wait_for_silos(self) -> list[int]:
        need = self.plan.federation.min_silos
        deadline = time.monotonic() + self.plan.federation.wait_for_silos_s
        while True:
            nodes = self._connected_nodes()
            if len(nodes) >= need:
                return nodes
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"only {len(nodes)} silo(s) connected after {self.plan.federation.wait_for_silos_s:.0f} s, the plan needs {need}"
                    + (f" ({len(self.unknown_nodes)} other node(s) hold no key of the coordinator kit and were sent nothing)" if self.unknown_nodes else ""),
                    fix="start more silos or lower federation.min_silos",
                )
            time.sleep(1.0)

    # --- one round --------------------------------------------------------------------

    def _train_round(self, round_: int, nodes: list[int], beside: _PendingEvaluation | None = None,
                     ) -> tuple[dict[str, dict[str, float]], int, list[int]]:
        """Train at ``nodes``; returns per-site figures, the number of valid updates, and the nodes that sent an update.

        ``beside``: the previous round's evaluation, asked in this round's train messages (the silos evaluate the
        model they receive, which is that round's, before they train) and finished as soon as the replies are in.
        """
        fed = self.plan.federation
        if fed.secure_aggregation != "none":
            if beside is not None:
                self._finish_evaluation(beside, [(self._send(beside.nodes or nodes, beside.round, "evaluate", beside.note), P.METRICS)])
            return self._secure_train_round(round_, nodes)
        replies = self._send_and_receive(self._messages(nodes, round_, "train", evaluate=beside), fed.round_timeout_s)
        if beside is not None:
            carried = [r for r in replies if not r.has_error() and P.EVALUATION in r.content]
            # A silo that answered itself but carried no evaluation (it refused the training, e.g. its privacy budget
            # is spent, or its witness refused the checkpoint) is asked to evaluate in a message of its own, as
            # before this change; its refusal then is audited as the evaluation's (a cosignature's) failure.
            own = {self._node_of(r) for r in replies if r.metadata.src_node_id == self._node_of(r)}  # not the SuperLink's
            again = sorted((own & set(beside.nodes or ())) - {self._node_of(r) for r in carried})
            batches = [(carried, P.EVALUATION)]
            if again:
                batches.append((self._send(again, beside.round, "evaluate", beside.note), P.METRICS))
            self._finish_evaluation(beside, batches)
        self.uplink_bytes = sum(_wire_size(r.content) for r in replies if not r.has_error())
        expect = Expectation(run_id=self.run_id, round=round_, norm_bound=fed.update_norm_bound, norm_action=fed.update_norm_action,
                             compression=fed.compression, topk_fraction=fed.topk_fraction)
        valid, sites = [], {}
        answered = {self._node_of(reply) for reply in replies}
        for node in nodes:
            if node not in answered:  # no reply within federation.round_timeout_s: the round goes on without it
                self.audit.append(EventType.UPDATE_MISSING, actor=self.actor, object={"type": "node", "id": str(node), "sha256": None},
                                  run_id=self.run_id, round=round_, outcome="failure",
                                  reason=f"no reply within {fed.round_timeout_s:g} s", details={"site": self.node_site.get(node)})
        for reply in replies:
            node = self._node_of(reply)
            if reply.has_error():
                reason = (reply.error.reason or "no reason given")[:300]
                self.audit.append(EventType.UPDATE_REJECTED, actor=self.actor, object={"type": "node", "id": str(node), "sha256": None},
                                  run_id=self.run_id, round=round_, outcome="failure", reason=reason,
                                  details={"code": int(reply.error.code), "site": self.node_site.get(node)})
                continue
            try:
                update = validate_reply(node, reply.content, self.global_state, expect)
                self.check_registered(node, update.site)
                if update.site in sites:
                    raise UpdateRejected("duplicate-site", f"node {node}'s reply names {update.site}, whose update this round came from another node")
            except UpdateRejected as exc:
                self.audit.append(EventType.UPDATE_REJECTED, actor=self.actor, object={"type": "node", "id": str(node), "sha256": None},
                                  run_id=self.run_id, round=round_, outcome="denied", reason=exc.code, details={"message": exc.message})
                continue
            if self.node_site.get(node) != update.site:
                # First reply of an authenticated SuperNode (the SuperLink checked its key): record who it is.
                self.audit.append(EventType.NODE_STARTED, actor=self.actor, object={"type": "node", "id": str(node), "sha256": None},
                                  run_id=self.run_id, round=round_, details={"site": update.site, "authenticated": self._authenticated(node)})
            self.node_site[node] = update.site
            digest = update.wire_sha256  # of the payload as it travelled: the silo's update.sent record names the same
            details = {"site": update.site, "node": str(node), "bytes": update.wire_bytes, "compression": fed.compression,
                       "l2_norm": update.l2_norm, "clipped": update.clipped, "num_examples": update.num_examples, "epsilon": update.metrics.get("epsilon")}
            if fed.compression != "float32":
                details.update(dense_bytes=state_nbytes(update.delta), delta_sha256=state_digest(update.delta))
            self.audit.append(EventType.UPDATE_RECEIVED, actor=self.actor, object={"type": "update", "id": f"{update.site}/{round_}", "sha256": digest},
                              run_id=self.run_id, round=round_, details=details)
            valid.append((update, digest))
            seconds = update.metrics.get("seconds")
            if isinstance(seconds, (int, float)) and math.isfinite(seconds):  # only orders the next round's pushes (_push)
                self.node_seconds[node] = float(seconds)
            sites[update.site] = {"num_examples": update.num_examples, "train_loss": update.metrics.get("train-loss"),
                                  "epsilon": update.metrics.get("epsilon"), "train_seconds": update.metrics.get("seconds")}
        need = max(fed.min_silos, self.rule.min_updates())
        if len(valid) < need:
            raise FedsiloError(
                f"round {round_}: {len(valid)} valid update(s) of {len(nodes)} silo(s), the plan needs {need}",
                fix="check the silos' error replies in the audit log (fedsilo audit show) and their logs",
            )
        started = time.perf_counter()
        aggregate = self.rule.aggregate([u.delta for u, _ in valid], [float(u.num_examples) for u, _ in valid])
        self.global_state = self.optimizer.step(self.global_state, aggregate)
        self.aggregate_seconds = time.perf_counter() - started
        self.audit.append(EventType.AGGREGATE_COMPUTED, actor=self.actor, object={"type": "model", "id": f"round-{round_}", "sha256": state_digest(self.global_state)},
                          run_id=self.run_id, round=round_,
                          details={"rule": self.rule.name, "rule_args": dict(fed.aggregation.args), "rule_details": _sites_named(self.rule.details, valid),
                                   "server_optimizer": self.optimizer.name, "server_lr": fed.server_lr,
                                   "inputs": [d for _, d in valid], "input_sites": [u.site for u, _ in valid], "aggregate_sha256": state_digest(aggregate)})
        return sites, len(valid), sorted({self._node_of(r) for r in replies if not r.has_error()})

    def _secure_train_round(self, round_: int, nodes: list[int]) -> tuple[dict[str, dict[str, float]], int, list[int]]:
        """Train at ``nodes`` through SecAgg+ (coordinator.secure_round): only the weighted mean is ever unmasked here."""
        from coordinator.secure_round import audit_secure_round, run_secure_round

        fed = self.plan.federation
        started = time.perf_counter()
        outcome = run_secure_round(self, round_, nodes)
        self.uplink_bytes = outcome.uplink_bytes
        sites = {}
        for node, c in outcome.contributions.items():
            if self.node_site.get(node) != c["site"]:
                self.audit.append(EventType.NODE_STARTED, actor=self.actor, object={"type": "node", "id": str(node), "sha256": None},
                                  run_id=self.run_id, round=round_, details={"site": c["site"], "authenticated": self._authenticated(node)})
            self.node_site[node] = c["site"]
            m = c["metrics"]
            sites[c["site"]] = {"num_examples": c["num_examples"], "train_loss": m.get("train-loss"), "epsilon": m.get("epsilon"),
                                "train_seconds": m.get("seconds")}
        audit_secure_round(self, round_, outcome, self.node_site)
        need = fed.min_silos
        if len(outcome.contributions) < need:
            raise FedsiloError(f"round {round_}: {len(outcome.contributions)} silo(s) in the secure sum of {len(nodes)}, the plan needs {need}",
                               fix="check the silos' error replies in the audit log (fedsilo audit show) and their logs")
        aggregate_started = time.perf_counter()
        self.global_state = self.optimizer.step(self.global_state, outcome.aggregate)
        self.aggregate_seconds = outcome.stage_seconds.get("unmask", 0.0) + time.perf_counter() - aggregate_started
        p = outcome.params
        self.audit.append(EventType.AGGREGATE_COMPUTED, actor=self.actor, object={"type": "model", "id": f"round-{round_}", "sha256": state_digest(self.global_state)},
                          run_id=self.run_id, round=round_,
                          details={"rule": self.rule.name, "secure_aggregation": fed.secure_aggregation, "server_optimizer": self.optimizer.name,
                                   "server_lr": fed.server_lr, "input_sites": sorted(c["site"] for c in outcome.contributions.values()),
                                   "dropped_nodes": [{"node": str(n), "site": self.node_site.get(n), "stage": s} for n, s in sorted(outcome.dropped.items())],
                                   "num_shares": p["num_shares"], "reconstruction_threshold": p["reconstruction_threshold"],
                                   "clipping_range": p["clipping_range"], "quantization_range": p["quantization_range"], "max_weight": p["max_weight"],
                                   "uplink_bytes": outcome.uplink_bytes, "stage_seconds": outcome.stage_seconds,
                                   "aggregate_sha256": state_digest(outcome.aggregate), "seconds": round(time.perf_counter() - started, 3)})
        return sites, len(outcome.contributions), sorted(outcome.contributions)

    def _finish_evaluation(self, pending: _PendingEvaluation, batches: list[tuple[list, str]], **extra: Any) -> None:
        """Merge an evaluation's replies (``(replies, metrics key)`` batches) and ``extra`` figures into its round's
        row, rewrite metrics.json and publish the complete row as an ``evaluated`` progress line (coordinator.progress)."""
        for replies, metrics_key in batches:
            self._take_evaluations(replies, pending.round, pending.row["sites"], pending.note, metrics_key)
        pending.row.update(extra)
        _write_json(self.out_dir / "metrics.json", summarize(self.state))
        self._progress({"event": "evaluated", **pending.row})

    def _evaluate_round(self, round_: int, nodes: list[int], sites: dict[str, dict[str, Any]], note: bytes | None) -> None:
        self._take_evaluations(self._send(nodes, round_, "evaluate", note), round_, sites, note)

    def _take_evaluations(self, replies: list, round_: int, sites: dict[str, dict[str, Any]], note: bytes | None,
                          metrics_key: str = P.METRICS) -> None:
        """Each reply's evaluation metrics (``metrics_key``: an evaluate reply's metrics, or the evaluation a train
        reply carries) into ``sites``; its cosignature of ``note``, checked, into the audit log."""
        for reply in replies:
            if reply.has_error():
                node = self._node_of(reply)
                self.audit.append(EventType.CHECKPOINT_COSIGNED if note else EventType.RUN_FAILED, actor=self.actor, run_id=self.run_id,
                                  round=round_, outcome="failure", reason=(reply.error.reason or "no reason given")[:300],
                                  details={"site": self.node_site.get(node), "node": str(node), "phase": "evaluate"})
                continue
            if P.IDENTITY not in reply.content or metrics_key not in reply.content:
                continue
            # Figures are filed under the site this node is known to be (from its validated updates), never under a
            # name a reply claims for itself; a node not known yet, or claiming another site, is ignored.
            site = self.node_site.get(reply.metadata.src_node_id)
            if site is None or reply.content[P.IDENTITY].get(P.SITE) != site:
                continue
            if self.node_keys is not None and self.kit_site.get(reply.metadata.src_node_id) != site:  # a resumed run's older record
                continue
            if note is not None and P.WITNESS in reply.content:
                cosigned = reply.content[P.WITNESS].get(P.COSIGNED)
                if isinstance(cosigned, bytes) and len(cosigned) <= MAX_COSIGNED_BYTES:
                    self._keep_cosignature(site, reply.metadata.src_node_id, cosigned, round_)
            metrics = {k: float(v) for k, v in dict(reply.content[metrics_key]).items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
            entry = sites.setdefault(site, {})
            for key, name in EVALUATION_FIGURES.items():
                if key in metrics:
                    entry[name] = metrics[key]

    # --- the run ----------------------------------------------------------------------

    def execute(self) -> RunState:
        plan = self.plan
        if self.resume is not None:
            first = self.resume.round + 1
            self.audit.append(EventType.RUN_RESUMED, actor=self.actor, object={"type": "model", "id": f"round-{self.resume.round}", "sha256": self.resume.model_sha256},
                              run_id=self.run_id, round=first, details={"after_round": self.resume.round, "state_sha256": self.resume.file_sha256,
                                                                         "flower_run_id": self.flower_run_id})
        else:
            first = 1
            self._record_start()
        # Plain rounds evaluate each round's model in the next round's train messages (one exchange per round instead
        # of two); SecAgg+ rounds keep their own multi-stage exchange and evaluate right after it.
        pipelined = plan.federation.secure_aggregation == "none"
        pending = self._unfinished_evaluation() if self.resume is not None else None
        try:
            for round_ in range(first, plan.federation.rounds + 1):
                start = time.perf_counter()
                nodes = self._wait_for_silos()
                self.audit.append(EventType.ROUND_STARTED, actor=self.actor, run_id=self.run_id, round=round_, details={"nodes": len(nodes)})
                if pending is not None and pending.nodes is None:
                    pending.nodes = nodes
                sites, n_valid, answered = self._train_round(round_, nodes, pending)
                note = self._sign_checkpoint(round_)
                # A silo that did not answer within the timeout is down or hung (asking it to evaluate would
                # only wait out the timeout a second time), one that answered with an error refused or failed:
                # only silos that sent an update evaluate. All are asked again next round.
                if not pipelined:
                    self._evaluate_round(round_, answered, sites, note)
                row = {"round": round_, "replied": n_valid, "silos": len(nodes), "seconds": round(time.perf_counter() - start, 2),
                       "aggregate_seconds": round(self.aggregate_seconds, 4), "uplink_bytes": self.uplink_bytes, "sites": sites,
                       "evaluation": EVALUATED_WITH_NEXT_ROUND if pipelined else EVALUATED_IN_ROUND}
                self.state.rounds.append(row)
                self._checkpoint(row)  # before the next round's training leaves with this model
                self.audit.append(EventType.ROUND_FINISHED, actor=self.actor, object={"type": "model", "id": f"round-{round_}", "sha256": state_digest(self.global_state)},
                                  run_id=self.run_id, round=round_, details={"valid_updates": n_valid, "seconds": row["seconds"]})
                self._progress({"event": "round", **row})
                if pipelined:
                    pending = _PendingEvaluation(round_, answered, note, row)
            if pending is not None:  # the last round's model: an exchange of its own
                started = time.perf_counter()
                replies = self._send(pending.nodes or self._wait_for_silos(), pending.round, "evaluate", pending.note)
                self._finish_evaluation(pending, [(replies, P.METRICS)], final_evaluation_seconds=round(time.perf_counter() - started, 2))
        except FedsiloError as exc:
            self.audit.append(EventType.RUN_FAILED, actor=self.actor, run_id=self.run_id, outcome="failure", reason=exc.one_line())
            self._progress({"event": "failed", "reason": exc.one_line()})
            raise
        self.audit.append(EventType.MODEL_EXPORTED, actor=self.actor, object={"type": "model", "id": "model.safetensors", "sha256": state_digest(self.global_state)}, run_id=self.run_id)
        self.audit.append(EventType.RUN_FINISHED, actor=self.actor, run_id=self.run_id, details={"rounds": len(self.state.rounds)})
        self._sign_checkpoint(None)  # anchors the run's last records
        self._progress({"event": "finished"})
        self.audit.close()
        return self.state

    def _unfinished_evaluation(self) -> _PendingEvaluation | None:
        """After a resume: the last completed round's evaluation, unless the interrupted run had published it.

        A round's row is checkpointed before its evaluation (which travels with the next round's training), so the
        evaluations the interrupted run published (``evaluated`` lines in rounds.jsonl) are merged back into the
        checkpoint's rows, and only a round whose evaluation was never published is evaluated again (with a fresh
        checkpoint to cosign).
        """
        published = {r.get("round"): r for r in read_rows(self.out_dir / "logs" / ROUNDS_FILE) if r.get("event") == "evaluated"}
        for row in self.state.rounds:
            for site, figures in (published.get(row.get("round")) or {}).get("sites", {}).items():
                row["sites"].setdefault(site, {}).update(figures)
        if not self.state.rounds:
            return None
        last = self.state.rounds[-1]
        if last.get("evaluation") != EVALUATED_WITH_NEXT_ROUND or last["round"] in published:
            return None
        return _PendingEvaluation(last["round"], None, self._sign_checkpoint(last["round"]), last)

    def _record_start(self) -> None:
        """A new run: keep the plan and the researcher's submission in the run folder (a resume re-reads them) and audit both."""
        plan = self.plan
        (self.out_dir / "plan.yaml").write_text(self.plan_text, encoding="utf-8")
        if self.submission is not None:
            (self.out_dir / SUBMISSION_FILE).write_text(self.submission.to_json(), encoding="utf-8")
            statement = self.submission.verify(self.plan_hash)
            researcher = {"kind": "person", "id": statement.signer.name, "site": None, "role": "researcher", "key": statement.signer.fingerprint}
            self.audit.append(EventType.PLAN_SUBMITTED, actor=researcher, object={"type": "plan", "id": plan.name[:100], "sha256": self.plan_hash},
                              run_id=self.run_id, details={"signed_at": statement.fields.get("time"), "submission_sha256": hashlib.sha256(self.submission.note).hexdigest()})
        self.audit.append(EventType.RUN_STARTED, actor=self.actor, object={"type": "plan", "id": plan.name, "sha256": self.plan_hash}, run_id=self.run_id,
                          details={"rounds": plan.federation.rounds, "rule": plan.federation.aggregation.rule, "min_silos": plan.federation.min_silos,
                                   "initial_model_sha256": state_digest(self.global_state), "flower_run_id": self.flower_run_id})

    def _progress(self, row: dict[str, Any]) -> None:
        line = json.dumps(row)
        with open(self.out_dir / "logs" / ROUNDS_FILE, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        print(PROGRESS_PREFIX + line, flush=True)

    def _checkpoint(self, row: dict[str, Any]) -> None:
        """The round's model, metrics and run state, each written atomically; the state's hashes are audited."""
        save_model(self.out_dir / "model.safetensors", self.global_state, metadata={"plan_hash": self.plan_hash, "round": str(row["round"])})
        _write_json(self.out_dir / "metrics.json", summarize(self.state))
        snap = save_snapshot(self.out_dir, RunSnapshot(
            run_id=self.run_id, plan_hash=self.plan_hash, round=row["round"], global_state=self.global_state,
            optimizer_state=self.optimizer.state_dict(), rounds=self.state.rounds, node_site=self.node_site, witnessed_size=self.witnessed_size))
        self.audit.append(EventType.STATE_SAVED, actor=self.actor, object={"type": "state", "id": f"round-{row['round']}", "sha256": snap.file_sha256},
                          run_id=self.run_id, round=row["round"], details={"model_sha256": snap.model_sha256, "optimizer": self.optimizer.name})


def _opened(reply, sent: dict):
    """``reply`` with its sealed content opened (fedsilo.envelope); one that cannot be opened becomes an error reply
    from its node, which the round audits as a rejected update like any other refusal."""
    from flwr.app import Error, Message, RecordDict

    if reply.has_error() or not reply.has_content() or not is_sealed(reply.content):
        return reply
    try:
        reply.content = open_content(reply.content, P.RECORDS_FROM_SILO)
    except EnvelopeError as exc:
        original = sent.get(reply.metadata.reply_to_message_id)
        if original is None:  # not a reply to these messages (Flower pulls only those): nothing of it is read
            reply.content = RecordDict()
            return reply
        return Message(Error(P.ERR_BAD_INPUT, f"reply envelope: {exc}"), reply_to=original)
    return reply


def _wire_size(content) -> int:
    """A reply's serialized size (Flower's protobuf encoding of its records): the bytes it took on the wire."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).ByteSize()


def _sites_named(details: dict[str, Any], valid: list) -> dict[str, Any]:
    """A rule's details with update indices (e.g. Krum's selection) also given as site names."""
    out = {k: _plain(v) for k, v in (details or {}).items()}
    for key, value in list(out.items()):
        if key in ("selected", "clipped") and isinstance(value, list) and all(isinstance(i, int) and 0 <= i < len(valid) for i in value):
            out[f"{key}_sites"] = [valid[i][0].site for i in value]
    return out


def _plain(value: Any) -> Any:
    """numpy scalars and tuples as JSON values (audit records take JSON only)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value


#: An evaluation reply's metric -> its name in a round's per-site figures (metrics.json). ``personalized-*``: the
#: site's personalized model at the final evaluation (``training.personalize``).
EVALUATION_FIGURES = {"dice": "dice", "accuracy": "accuracy", "auc": "auc", "loss": "test_loss", "seconds": "eval_seconds",
                      "personalized-dice": "personalized_dice", "personalized-accuracy": "personalized_accuracy",
                      "personalized-auc": "personalized_auc", "personalized-loss": "personalized_test_loss"}


def summarize(state: RunState) -> dict[str, Any]:
    """metrics.json: every round's per-site figures and the final ones (with personalized models, each site's
    personalized figure and its gain over the final global model's: ``personalization_gain_<metric>_per_site``)."""
    rounds = [{"round": r["round"], "replied": r["replied"], "seconds": r["seconds"], "aggregate_seconds": r.get("aggregate_seconds"), "uplink_bytes": r.get("uplink_bytes"),
               "sites": dict(sorted(r["sites"].items()))} for r in state.rounds]
    final: dict[str, Any] = {}
    if rounds:
        last = rounds[-1]["sites"]
        for metric in ("dice", "accuracy", "auc"):
            per_site = {s: m[metric] for s, m in last.items() if m.get(metric) is not None}
            if per_site:
                final[f"{metric}_per_site"] = per_site
                final[f"{metric}_mean"] = float(np.mean(list(per_site.values())))
            personal = {s: m[f"personalized_{metric}"] for s, m in last.items() if m.get(f"personalized_{metric}") is not None}
            if personal:
                final[f"personalized_{metric}_per_site"] = personal
                final[f"personalized_{metric}_mean"] = float(np.mean(list(personal.values())))
                final[f"personalization_gain_{metric}_per_site"] = {s: v - per_site[s] for s, v in personal.items() if s in per_site}
        final["epsilon_per_site"] = {s: max((r["sites"].get(s, {}).get("epsilon") or 0.0) for r in rounds) for s in sorted({s for r in rounds for s in r["sites"]})}
    return {"plan_hash": state.plan_hash, "run_id": state.run_id, "rounds": rounds, "final": final}
