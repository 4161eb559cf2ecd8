"""The silo agent: a Flower ClientApp behind the hospital's SuperNode.

Node config (``flower-supernode --node-config``): ``site-dir`` (required), ``threads``
(optional torch thread count). Per train message: check the plan, read the site's registered
dataset through MONAI, train with DP-SGD, record the spend in the privacy ledger (durably,
before anything leaves), send back the weight delta, num-examples, allow-listed metrics and
epsilon, and write what left into the local audit log. Refusals and failures become Flower
error replies carrying a one-line reason and no PHI; details stay in the site's own log.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app import Error
from flwr.clientapp import ClientApp

from compliance import AuditLog, EventType
from fedsilo import protocol as P
from fedsilo.envelope import EnvelopeError, is_sealed, open_content, seal
from fedsilo.errors import ConfigError, DataError, FedsiloError, RefusalError
from silo_agent.egress import check_arrays, check_metrics
from silo_agent.kept_models import personalized_model_path
from silo_agent.secure_aggregation import secure_aggregation_mod
from silo_agent.site import Site

app = ClientApp()
log = logging.getLogger("fedsilo.silo")


@app.train(mods=[secure_aggregation_mod])
def train(msg: Message, context: Context) -> Message:
    return _handle(msg, context, "train")


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return _handle(msg, context, "evaluate")


def _site_dir(context: Context) -> object:
    """The node's site folder: node config ``site-dir`` (deployment), or in Flower's simulation
    engine the ``partition-id``-th entry of the run config's ``site-dirs`` (os.pathsep-separated)."""
    if "site-dir" in context.node_config:
        return context.node_config["site-dir"]
    partition = context.node_config.get("partition-id")
    site_dirs = [d for d in str(context.run_config.get("site-dirs", "")).split(os.pathsep) if d]
    if isinstance(partition, int) and 0 <= partition < len(site_dirs):
        return site_dirs[partition]
    return None


def _handle(msg: Message, context: Context, kind: str) -> Message:
    site_dir = _site_dir(context)
    try:
        if not isinstance(site_dir, str) or not site_dir:
            raise ConfigError("this SuperNode has no site-dir in its node config", fix="start it with --node-config \"site-dir='/path/to/site'\"")
        site = Site.open(site_dir)
    except FedsiloError as exc:
        return Message(Error(P.ERR_BAD_INPUT, exc.one_line()), reply_to=msg)
    _configure_logging(site.logs_dir)
    _set_threads(context.node_config.get("threads"))
    actor = site.actor()
    with AuditLog.open(site.audit_dir, source="silo-agent") as audit:
        sealed, unopened = _open(msg)
        run_id, round_ = _run_and_round(msg)
        try:
            if unopened is not None:
                raise RefusalError(f"the coordinator's message cannot be opened: {unopened}")
            handler = _train if kind == "train" else _evaluate
            content = handler(msg, site, audit, actor)
            # A sealed message is answered sealed (one object on the wire); an unsealed one (SecAgg+) as it came.
            return Message(seal(content) if sealed else content, reply_to=msg)
        except FedsiloError as exc:
            refused = isinstance(exc, RefusalError)
            # Data errors name local files, and hospital paths can carry patient names: the full text
            # stays in the site's own log; the audit record and the reply get the kind of error only.
            reason = "the site's data cannot be used for this plan (see the site's logs/silo.log)" if isinstance(exc, DataError) else exc.one_line()
            log.error("%s refused: %s", kind, exc.one_line())
            audit.append(EventType.PLAN_REFUSED if refused else EventType.RUN_FAILED, actor=actor, run_id=run_id or None,
                         round=round_ or None, outcome="denied" if refused else "failure", reason=reason)
            code = P.ERR_REFUSED if refused else P.ERR_BAD_INPUT
            return Message(Error(code, f"{site.site_id}: {reason}"), reply_to=msg)
        except Exception as exc:  # noqa: BLE001 - a silo must answer, and must not leak details
            # The local log gets the stack (code locations only); the message text may hold paths.
            frames = "".join(traceback.format_list(traceback.extract_tb(exc.__traceback__)))
            log.error("%s failed with %s at\n%s", kind, type(exc).__name__, frames)
            audit.append(EventType.RUN_FAILED, actor=actor, run_id=run_id or None, round=round_ or None,
                         outcome="failure", reason=f"internal error ({type(exc).__name__})")
            return Message(Error(P.ERR_INTERNAL, f"{site.site_id}: internal error ({type(exc).__name__}); see the site's logs/silo.log"), reply_to=msg)


def _open(msg: Message) -> tuple[bool, EnvelopeError | None]:
    """Open a sealed message's content in place (fedsilo.envelope); returns whether it was sealed, and why it could not
    be opened (its content is then emptied: nothing of it is read)."""
    if not msg.has_content() or not is_sealed(msg.content):
        return False, None
    try:
        msg.content = open_content(msg.content, P.RECORDS_TO_SILO)
    except EnvelopeError as exc:
        msg.content = RecordDict()
        return False, exc
    return True, None


def _run_and_round(msg: Message) -> tuple[str, int]:
    """The run id and round a message names, for audit records ("" and 0 when absent or malformed)."""
    try:
        cfg = msg.content[P.CONFIG]
        return str(cfg.get(P.RUN_ID, ""))[:64], int(cfg.get(P.ROUND, 0))
    except (KeyError, TypeError, ValueError):
        return "", 0


def _configure_logging(logs_dir: Path) -> None:
    """Log to this site's logs/silo.log (one process may serve several sites in simulation)."""
    path = str((logs_dir / "silo.log").resolve())
    if any(getattr(h, "baseFilename", None) == path for h in log.handlers):
        return
    for old in list(log.handlers):
        log.removeHandler(old)
        old.close()
    logs_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def _set_threads(threads: object) -> None:
    if threads:
        import torch

        torch.set_num_threads(int(threads))


def _plan_from(msg: Message):
    """Parse the plan sent with the message and check it is the one its hash names."""
    from pipelines.plan import parse_plan_text

    if P.CONFIG not in msg.content or P.ARRAYS not in msg.content:
        raise RefusalError("message lacks the plan or the global model")
    cfg = msg.content[P.CONFIG]
    plan = parse_plan_text(str(cfg[P.PLAN_YAML]), source="the plan sent by the coordinator")
    if plan.hash() != cfg[P.PLAN_HASH]:
        raise RefusalError(f"plan hash mismatch: the plan text hashes to {plan.hash()[:12]}, the message names {str(cfg[P.PLAN_HASH])[:12]}")
    return plan, str(cfg[P.RUN_ID]), int(cfg[P.ROUND])


def _approved(msg: Message, site: Site, plan, audit: AuditLog, actor: dict, run_id: str, round_: int):
    """Refuse, before any data is read, a plan that is unsigned, unapproved here, or outside the site policy."""
    from silo_agent.approvals import require_approval, verify_submission

    cfg = msg.content[P.CONFIG]
    if P.SUBMISSION not in cfg or P.RESEARCHER_KEY not in cfg:
        raise RefusalError("the plan carries no researcher signature (submit it with 'fedsilo plan sign')")
    plan_hash = plan.hash()
    submission = verify_submission(str(cfg[P.PLAN_YAML]), plan_hash, bytes(cfg[P.SUBMISSION]), str(cfg[P.RESEARCHER_KEY]))
    audit.append(EventType.PLAN_RECEIVED, actor=actor, object={"type": "plan", "id": plan.name[:100], "sha256": plan_hash}, run_id=run_id, round=round_,
                 details={"researcher": submission.researcher, "researcher_key": submission.fingerprint, "message": msg.metadata.message_type})
    from silo_agent.site import record_policy_if_changed

    record_policy_if_changed(site, actor=actor)  # a hand-edited policy is recorded before it takes effect
    return require_approval(site, plan, str(cfg[P.PLAN_YAML]), plan_hash, submission)


def _global_model(msg: Message, plan):
    """Build the plan's network and load the global weights, refusing foreign tensors."""
    import torch

    from fedsilo.wire import HEADER_MAX, WireError, unpack_record
    from pipelines.networks import build_network
    from pipelines.serialization import state_nbytes, to_numpy

    model = build_network(plan)
    reference = to_numpy(model.state_dict())
    try:  # no bigger than the plan's network (plus its header) before anything is decoded
        arrays = unpack_record(msg.content[P.ARRAYS], max_bytes=state_nbytes(reference) + 8 + HEADER_MAX)
    except WireError as exc:
        raise RefusalError(f"global model: {exc}") from None
    try:
        check_arrays(arrays, reference)
    except RefusalError as exc:
        raise RefusalError(exc.message.replace("egress blocked: update", "global model:")) from None
    global_state = {k: torch.from_numpy(v) for k, v in arrays.items()}
    model.load_state_dict(global_state)
    return model, global_state


def _load(site: Site, plan, split: str):
    """The registered dataset's split as arrays, through MONAI behind the site's preprocessing cache."""
    from pipelines.dataset import apply_transforms, load_cases, load_split
    from pipelines.transforms import split_transforms

    entry = site.dataset(plan.data.dataset)
    if entry.task != plan.task:
        raise RefusalError(f"dataset '{entry.name}' is registered for {entry.task}, the plan trains {plan.task}")
    cache_dir = site.cache_dir if plan.data.cache else None
    if entry.registry is not None:
        from silo_agent.registry import load_registry

        data = load_cases(load_registry(entry.registry).case_sources(split), task=plan.task, num_classes=plan.data.num_classes,
                          cache_dir=cache_dir)
    else:  # registered before the registry existed: read through its datalist
        data = load_split(entry.datalist, split, task=plan.task, num_classes=plan.data.num_classes, cache_dir=cache_dir)
    deterministic, random = split_transforms(plan.data.transforms, segmentation=plan.is_segmentation)
    data = apply_transforms(data, deterministic, segmentation=plan.is_segmentation)
    return entry, data, random


def _train(msg: Message, site: Site, audit: AuditLog, actor: dict) -> RecordDict:
    from pipelines.compression import payload_nbytes
    from pipelines.serialization import clip_to_norm, l2_norm, state_digest, state_nbytes, to_numpy
    from pipelines.training import train_local
    from silo_agent.ledger import PrivacyLedger, Spend
    from silo_agent.secure_aggregation import SECURE_CHANNEL

    started = time.perf_counter()  # the silo's whole work on this message: checks, data, evaluation (if asked), training
    plan, run_id, round_ = _plan_from(msg)
    plan_hash = plan.hash()
    secure = plan.federation.secure_aggregation != "none"
    if secure and not SECURE_CHANNEL.get():
        raise RefusalError(f"the plan requires secure aggregation ({plan.federation.secure_aggregation}), but this request would send the update in the clear")
    _approved(msg, site, plan, audit, actor, run_id, round_)
    model, global_state = _global_model(msg, plan)  # refuse a foreign model before reading any data
    with PrivacyLedger.for_site(site.privacy_dir) as ledger:
        entry = site.dataset(plan.data.dataset)
        if plan.privacy.enabled and ledger.has_spent(entry.name, run_id, round_):
            if secure:  # the same update in two secure sums: their difference would be this silo's update
                raise RefusalError(f"round {round_} of run {run_id[:12]} was already answered; a secure round is never answered twice")
            return _resend(site, audit, actor, run_id, round_, entry.name, global_state, plan.federation,
                           lambda: _evaluate_first(msg, site, plan, model, audit, actor, run_id, round_))
        history = ledger.history(entry.name) if plan.privacy.enabled else []
        noise, planned_cases = None, 0
        if plan.privacy.enabled:  # from the registry's case count: no image is read for a round that is refused
            planned_cases = _case_count(entry, "training")
            noise = _check_budget(site, plan, entry.name, history, planned_cases)
        evaluation = _evaluate_first(msg, site, plan, model, audit, actor, run_id, round_)  # before training changes the model
        entry, data, random = _load(site, plan, "training")
        if plan.privacy.enabled and len(data) != planned_cases:  # the noise the budget was checked with is the noise trained with
            noise = _check_budget(site, plan, entry.name, history, len(data))
        audit.append(EventType.DATASET_USED, actor=actor, object={"type": "dataset", "id": entry.name, "sha256": None},
                     run_id=run_id, round=round_, details={"cases": len(data), "split": "training"})
        lr_scale = _personalizing_lr_scale(plan, round_, len(data))
        result = train_local(model, data, plan, history=history, random_transform=random, seed=secrets.randbits(62), noise_multiplier=noise,
                             lr_scale=lr_scale)
        metrics: dict[str, float] = {P.NUM_EXAMPLES: result.num_examples, "train-loss": result.train_loss,
                                     "seconds": time.perf_counter() - started}
        if result.privacy is not None:
            p = result.privacy
            # Durable before the update leaves: a crash after this point over-counts, never under-counts.
            ledger.record(Spend(dataset=entry.name, run_id=run_id, round=round_, plan_hash=plan_hash, accountant=p.accountant,
                                noise_multiplier=p.noise_multiplier, sample_rate=p.sample_rate, steps=p.steps, delta=p.delta,
                                epsilon_after=p.epsilon, history=(p.entry,)))
            audit.append(EventType.DP_SPENT, actor=actor, object={"type": "dataset", "id": entry.name, "sha256": None}, run_id=run_id, round=round_,
                         details={"mechanism": "DP-SGD (Gaussian)", "accountant": p.accountant, "noise_multiplier": p.noise_multiplier,
                                  "max_grad_norm": p.max_grad_norm, "sample_rate": p.sample_rate, "steps": p.steps, "delta": p.delta,
                                  "epsilon_cumulative": p.epsilon})
            metrics.update({"epsilon": p.epsilon, "delta": p.delta, "noise-multiplier": p.noise_multiplier,
                            "sample-rate": p.sample_rate, "steps": p.steps, "max-grad-norm": p.max_grad_norm})
    delta = {name: result.state_dict[name] - global_state[name] for name in global_state}
    reference = to_numpy(global_state)
    delta_np = to_numpy(delta)
    check_arrays(delta_np, reference)
    check_metrics(metrics)
    details = {"l2_norm": l2_norm(delta_np), "num_examples": result.num_examples, "dense_bytes": state_nbytes(delta_np)}
    fed = plan.federation
    if secure:  # the coordinator cannot check a masked update: the silo bounds its own (after DP noise: post-processing)
        delta_np, details["clipped"] = clip_to_norm(delta_np, fed.update_norm_bound)
        details["secure_aggregation"] = fed.secure_aggregation
    payload = _compress(site, run_id, round_, fed, delta_np)
    details.update(compression=fed.compression, bytes=payload_nbytes(payload))
    if plan.training.personalize and round_ == fed.rounds:  # the last round's model, fine-tuned here, stays here
        _keep_personalized(site, audit, actor, plan, run_id, round_, result.state_dict, lr_scale)  # before the outbox: a
        # retried round answered from it (no training) still finds this model
    if result.privacy is not None:  # a retried round (coordinator resumed) gets this update again, at no new cost
        from silo_agent.outbox import save_update

        save_update(site.root, run_id, round_, state_digest(global_state), payload, metrics)
    audit.append(EventType.UPDATE_SENT, actor=actor, object={"type": "update", "id": f"{run_id}/{round_}", "sha256": state_digest(payload)},
                 run_id=run_id, round=round_, details=details)
    return _reply(site, run_id, round_, fed, payload, metrics, reference, evaluation)


def _personalizing_lr_scale(plan, round_: int, cases: int) -> float:
    """The factor on the plan's learning rate for this round's training: in the last round of a plan that
    personalizes (after at least one federated round), the training is the fine-tuning of a trained global model,
    and a site with fewer cases than the batch fine-tunes with SGD at the rate times ``cases / batch_size``
    (:func:`pipelines.training.finetune_lr_scale`); otherwise 1. Not for Adam, whose steps do not grow with the
    gradient's weight per case (the rule's reason), and which no bench measured.

    The update this round sends is that same training, so such a site's last update is smaller too: the final
    global model of a personalizing plan is not quite the one the same plan makes without ``personalize``."""
    from pipelines.training import finetune_lr_scale

    if not plan.training.personalize or round_ != plan.federation.rounds or round_ < 2 or plan.training.optimizer.name != "sgd":
        return 1.0
    return finetune_lr_scale(cases, plan.training.batch_size)


def _keep_personalized(site: Site, audit: AuditLog, actor: dict, plan, run_id: str, round_: int, state,
                       lr_scale: float) -> None:
    """Keep the last round's local model: the global model of round ``rounds - 1`` fine-tuned on this site's data
    (Wang et al. 2019, arXiv:1910.10252), at the plan's learning rate times ``lr_scale``
    (:func:`_personalizing_lr_scale`). Its training is the last round's, already in the privacy ledger."""
    from pipelines.serialization import save_model, state_digest, to_numpy

    arrays = to_numpy(state)
    path = personalized_model_path(site, run_id)
    save_model(path, arrays, metadata={"run_id": run_id, "round": str(round_), "plan_hash": plan.hash(),
                                       "kind": "personalized"})
    audit.append(EventType.STATE_SAVED, actor=actor, object={"type": "model", "id": f"personalized/{run_id}", "sha256": state_digest(arrays)},
                 run_id=run_id, round=round_, details={"kind": "personalized model, kept at this site and never sent",
                                                       "path": str(path.relative_to(site.root)), "lr_scale": lr_scale,
                                                       "plan_hash": plan.hash()})
    log.info("run %s round %d: personalized model kept in %s (fine-tuned at %.3g x the plan's learning rate)",
             run_id[:12], round_, path.relative_to(site.root), lr_scale)


def _personalized_model(site: Site, plan, run_id: str, round_: int):
    """The site's personalized model of the run when the plan asks for one and this is the final evaluation, else
    None. A file whose tensors are not the plan's network's is refused, as a foreign global model is."""
    import torch

    from pipelines.networks import build_network
    from pipelines.serialization import load_model, to_numpy

    if not plan.training.personalize or round_ != plan.federation.rounds:
        return None
    path = personalized_model_path(site, run_id)
    if not path.is_file():
        return None  # this site did not train the last round (it joined late, or its update was refused)
    model = build_network(plan)
    arrays = load_model(path)
    try:
        check_arrays(arrays, to_numpy(model.state_dict()))
    except RefusalError as exc:
        detail = exc.message.removeprefix("egress blocked: ").replace("update tensors", "its tensors").replace("the global model", "the plan's network")
        raise RefusalError(f"personalized model {path.name} is not the plan's network ({detail}); remove it from "
                           f"the site's models folder to evaluate the global model alone") from None
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in arrays.items()})
    return model


def _evaluate_first(msg: Message, site: Site, plan, model, audit: AuditLog, actor: dict, run_id: str, round_: int) -> RecordDict | None:
    """The evaluation a train message asks for (``P.EVALUATE``): the carried global model, which is the previous
    round's, on the site's test cases, and the cosignature of that round's checkpoint when one is sent; the
    records it adds to the train reply, or None when none is asked.

    The coordinator asks it here rather than in a message of its own because a SuperNode handles one message
    at a time: a separate evaluate message would cost a whole exchange through the SuperLink per round. A
    checkpoint that does not extend what this site witnessed refuses the whole message, training included
    (:func:`_witness`): a coordinator with a forked log gets no update from it."""
    if P.EVALUATE not in msg.content:
        return None
    evaluated = msg.content[P.EVALUATE].get(P.ROUND)
    if isinstance(evaluated, bool) or not isinstance(evaluated, int) or not 0 <= evaluated < round_:
        raise RefusalError(f"the train message of round {round_} asks to evaluate round {evaluated!r}; only an earlier round's model can be")
    metrics, cosigned = _evaluation(msg, site, plan, model, audit, actor, run_id, evaluated)
    records = RecordDict({P.EVALUATION: MetricRecord(metrics)})
    if cosigned is not None:
        records[P.WITNESS] = ConfigRecord({P.COSIGNED: cosigned})
    return records


def _evaluation(msg: Message, site: Site, plan, model, audit: AuditLog, actor: dict, run_id: str, round_: int,
                started: float | None = None) -> tuple[dict, bytes | None]:
    """``model`` (round ``round_``'s global model) on the site's test cases, audited, and at the final evaluation
    of a plan that personalizes, the site's personalized model beside it (its figures as ``personalized-<metric>``);
    and the cosignature of the checkpoint the message carries, if any. ``seconds`` counts from ``started``
    (default: now)."""
    from pipelines.metrics import evaluate as evaluate_model
    from silo_agent.egress import PERSONALIZED_PREFIX

    started = time.perf_counter() if started is None else started
    personal = _personalized_model(site, plan, run_id, round_)
    entry, data, _ = _load(site, plan, "test")
    metrics = evaluate_model(model, data, plan)
    if personal is not None:
        metrics.update({PERSONALIZED_PREFIX + k: v for k, v in evaluate_model(personal, data, plan).items() if k != P.NUM_EXAMPLES})
    metrics["seconds"] = time.perf_counter() - started  # for the coordinator's per-round overhead figure
    check_metrics(metrics)
    audit.append(EventType.DATASET_USED, actor=actor, object={"type": "dataset", "id": entry.name, "sha256": None},
                 run_id=run_id, round=round_, details={"cases": len(data), "split": "test", **{k: v for k, v in metrics.items() if k != P.NUM_EXAMPLES}})
    cosigned = _witness(msg.content[P.WITNESS], site, audit, actor, run_id, round_) if P.WITNESS in msg.content else None
    return metrics, cosigned


def _compress(site: Site, run_id: str, round_: int, fed, delta: dict) -> dict:
    """The update as it travels (the plan's compression); top-k's error feedback stays at the site, per run."""
    if fed.compression == "float32":
        return delta
    from pipelines.compression import compress
    from silo_agent.outbox import load_residual, save_residual

    residual = load_residual(site.root, run_id, round_) if fed.compression == "topk" else None
    payload, residual = compress(delta, fed.compression, topk_fraction=fed.topk_fraction, residual=residual)
    if residual is not None:
        save_residual(site.root, run_id, round_, residual)
    return payload


def _reply(site: Site, run_id: str, round_: int, fed, payload: dict, metrics: dict, reference: dict,
           evaluation: RecordDict | None = None) -> RecordDict:
    from fedsilo.wire import pack

    content = RecordDict({
        P.ARRAYS: pack(payload),  # one object for the whole update (fedsilo.wire)
        P.METRICS: MetricRecord(metrics),
        P.IDENTITY: ConfigRecord({P.SITE: site.site_id, P.RUN_ID: run_id, P.ROUND: round_}),
    })
    for name, record in (evaluation or {}).items():
        content[name] = record
    _check_egress(content, site, run_id, round_, reference, fed)
    return content


def _resend(site: Site, audit: AuditLog, actor: dict, run_id: str, round_: int, dataset: str, global_state, fed,
            evaluate: Callable[[], RecordDict | None] = lambda: None) -> RecordDict:
    """Answer a retried round with the update already sent for it: no training, no new privacy spend. ``evaluate``
    (the evaluation the message asks for) runs only once the message is known to be a retry, not a replay."""
    from pipelines.serialization import state_digest, to_numpy
    from silo_agent.outbox import load_update

    reference = to_numpy(global_state)
    kept = load_update(site.root, run_id, round_, state_digest(reference))
    if kept is None:
        raise RefusalError(f"round {round_} of run {run_id[:12]} already trained on dataset '{dataset}' (replayed message)")
    payload, metrics = kept
    check_metrics(metrics)
    audit.append(EventType.UPDATE_RESENT, actor=actor, object={"type": "update", "id": f"{run_id}/{round_}", "sha256": state_digest(payload)},
                 run_id=run_id, round=round_, details={"dataset": dataset, "reason": "round retried with the same global model; no new training or privacy spend"})
    return _reply(site, run_id, round_, fed, payload, metrics, reference, evaluate())


def _evaluate(msg: Message, site: Site, audit: AuditLog, actor: dict) -> RecordDict:
    started = time.perf_counter()
    plan, run_id, round_ = _plan_from(msg)
    _approved(msg, site, plan, audit, actor, run_id, round_)
    model, _ = _global_model(msg, plan)
    metrics, cosigned = _evaluation(msg, site, plan, model, audit, actor, run_id, round_, started)
    content = RecordDict({P.METRICS: MetricRecord(metrics), P.IDENTITY: ConfigRecord({P.SITE: site.site_id})})
    if cosigned is not None:
        content[P.WITNESS] = ConfigRecord({P.COSIGNED: cosigned})
    _check_egress(content, site, run_id, round_, None)
    return content


def _check_egress(content: RecordDict, site: Site, run_id: str, round_: int, reference, fed=None) -> None:
    """The whole reply against the egress allow-list and the site policy; a block is audited by _handle."""
    from silo_agent.egress import check_reply
    from silo_agent.policy import load_policy

    layout = None
    if reference is not None:
        from pipelines.compression import payload_layout

        layout = payload_layout(reference, fed.compression, fed.topk_fraction)
    check_reply(content, site_id=site.site_id, run_id=run_id, round_=round_,
                allowed_metrics=load_policy(site.root).allowed_metrics, layout=layout)


def _case_count(entry, split: str) -> int:
    """Cases in a split, from the registry (no source file is opened)."""
    if entry.registry is not None:
        from silo_agent.registry import load_registry

        cases = len(load_registry(entry.registry).split(split))
    else:
        from pipelines.dataset import read_datalist

        cases = len(read_datalist(entry.datalist).get(split) or [])
    if not cases:
        raise DataError(f"dataset '{entry.name}': the '{split}' split is empty", fix="register a dataset with cases in this split")
    return cases


def _check_budget(site: Site, plan, dataset: str, history: list, num_examples: int) -> float:
    """Refuse a round that could push the dataset past its lifetime epsilon (site policy), before training;
    returns the noise multiplier the check assumed (the one to train with)."""
    from pipelines.training import composed_epsilon, planned_round_entry
    from silo_agent.policy import load_policy

    budget = load_policy(site.root).lifetime_epsilon_per_dataset
    p = plan.privacy
    spent = composed_epsilon(history, delta=p.target_delta, accountant=p.accountant)
    planned = planned_round_entry(plan, num_examples, cache_dir=site.cache_dir)
    after = composed_epsilon([*history, planned], delta=p.target_delta, accountant=p.accountant)
    if after > budget:
        raise RefusalError(f"privacy budget: dataset '{dataset}' has spent epsilon {spent:.2f} of its lifetime {budget:g}; "
                           f"this round would bring it to {after:.2f}",
                           fix="the site may raise lifetime_epsilon_per_dataset in policy.yaml, or register fresh data")
    return planned[0]


def _other_proofs(entries) -> dict[int, list[bytes]]:
    """``P.OTHER_PROOFS``: old size -> consistency proof; a malformed entry is a refusal."""
    out: dict[int, list[bytes]] = {}
    for entry in entries if isinstance(entries, list) else ():
        entry = bytes(entry)
        if len(entry) < 8 or (len(entry) - 8) % 32:
            raise RefusalError("the witness request carries a malformed consistency proof")
        out[int.from_bytes(entry[:8], "big")] = [entry[i:i + 32] for i in range(8, len(entry), 32)]
    return out


def _witness(record: ConfigRecord, site: Site, audit: AuditLog, actor: dict, run_id: str, round_: int) -> bytes | None:
    """Cosign the coordinator's checkpoint if it extends the one this silo cosigned before; None when no proof from the
    size this silo holds came with it (audited). A checkpoint that does not extend it is a refusal (RefusalError)."""
    from compliance.checkpoint import parse_checkpoint, parse_note
    from compliance.witness import WitnessConflictError
    from fedsilo.errors import VerificationError
    from silo_agent.witnessing import check_cosigned, open_witness

    witness = open_witness(site.root, site.site_id, site.audit_dir)
    if witness is None:
        raise RefusalError("asked to witness a checkpoint, but the site trusts no coordinator key",
                           fix=f"install the coordinator's .vkey in {site.root / 'trust'}")
    note = bytes(record[P.CHECKPOINT])
    try:
        try:
            cosigned = witness.cosign(note, [bytes(h) for h in record.get(P.PROOF, [])], old_size=int(record[P.OLD_SIZE]))
        except WitnessConflictError as exc:  # this site holds a later checkpoint than the coordinator knew of
            others = _other_proofs(record.get(P.OTHER_PROOFS, []))
            if exc.held_size not in others:
                # Not evidence of a fork (the proof was made from another size): no cosignature this time, audited
                # here; a proof that fails, a smaller size or another root at the same size still refuse below.
                audit.append(EventType.CHECKPOINT_COSIGNED, actor=actor, run_id=run_id, round=round_, outcome="failure",
                             reason=f"not cosigned: {exc.one_line()}"[:300], details={"size": exc.size, "held_size": exc.held_size})
                return None
            cosigned = witness.cosign(note, others[exc.held_size], old_size=exc.held_size)
    except VerificationError as exc:  # audited by _handle as a refusal, with this reason
        raise RefusalError(f"witness refused the coordinator's checkpoint: {exc.one_line()}") from None
    check_cosigned(note, cosigned)
    checkpoint = parse_checkpoint(parse_note(note).text)
    audit.append(EventType.CHECKPOINT_COSIGNED, actor=actor, object={"type": "checkpoint", "id": f"{checkpoint.origin}/{checkpoint.size}",
                 "sha256": checkpoint.root.hex()}, run_id=run_id, round=round_, details={"size": checkpoint.size})
    return cosigned
