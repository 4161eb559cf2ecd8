"""Training plans: YAML validated into frozen, typed objects.

A plan is data, never code: every name in it maps to an allow-list (networks, transforms,
optimizers, losses, aggregation rules). Unknown keys are errors that name the key; bad values
are errors that name the key and say what is allowed. The canonical hash of a plan identifies
it everywhere (silo approvals, audit records, the model card).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedsilo.errors import ConfigError

TASKS = ("seg3d", "seg2d", "cls3d", "cls2d")
OPTIMIZERS = ("sgd", "adam")
LOSSES = ("dice", "dice_ce", "bce", "cross_entropy")
ACCOUNTANTS = ("rdp", "prv", "gdp")
METRICS = ("loss", "dice", "accuracy", "auc")
# Aggregation rules a plan may name. The coordinator's registry holds the implementations;
# the schema only knows their names so that pipelines stays free of coordinator imports.
AGGREGATION_RULES = (
    "fedavg", "median", "trimmed_mean", "krum", "multikrum", "bulyan", "geometric_median", "centered_clipping", "norm_bounded_mean",
)
SERVER_OPTIMIZERS = ("sgd", "adam", "yogi")
NORM_ACTIONS = ("reject", "clip")
# How updates travel from silo to coordinator (pipelines.compression implements them).
COMPRESSIONS = ("float32", "float16", "int8", "topk")
# ``secagg+``: Flower's SecAgg+ (Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic
# Overhead", CCS): the coordinator sees only the weighted sum of the silos' updates.
SECURE_AGGREGATION = ("none", "secagg+")
#: Rules that work on the sum alone, and so are possible under secure aggregation (every other rule needs to
#: look at individual updates: sort them, measure distances between them, or clip each one at the coordinator).
SECURE_RULES = ("fedavg",)
#: (section, key) -> default of keys added after the first plans were hashed: omitted from the normalized plan
#: (and so from its hash) at their default.
LATER_KEYS: dict[tuple[str, str], Any] = {
    ("training", "fedprox_mu"): 0.0,
    ("training", "personalize"): False,
    ("federation", "compression"): "float32",
    ("federation", "topk_fraction"): 0.01,
    ("federation", "secure_aggregation"): "none",
}


def _fail(key: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"plan key '{key}': {problem}", fix=fix)


def _boolean(d: dict, key: str, where: str, default: bool) -> bool:
    value = d.get(key, default)
    if not isinstance(value, bool):
        raise _fail(f"{where}.{key}", f"expected true or false, got {value!r}", "write true or false")
    return value


@dataclass(frozen=True)
class ModelSpec:
    """An allow-listed MONAI network and its keyword arguments (numbers, strings, lists)."""

    network: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TransformSpec:
    """One allow-listed MONAI dictionary transform with its arguments."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataSpec:
    """Which registered dataset each silo trains on and how it is preprocessed."""

    dataset: str = "default"
    transforms: tuple[TransformSpec, ...] = ()
    num_classes: int = 2
    cache: bool = True


@dataclass(frozen=True)
class OptimizerSpec:
    name: str = "sgd"
    lr: float = 0.5
    momentum: float = 0.9
    weight_decay: float = 0.0


@dataclass(frozen=True)
class TrainingSpec:
    """Each silo's local training.

    ``fedprox_mu``: weight of FedProx's proximal term ``mu/2 * ||w - w_global||^2`` in the local loss
    (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", arXiv:1812.06127); 0 is plain
    FedAvg local training. Under DP-SGD the term's gradient ``mu * (w - w_global)`` is added after
    clipping and noise: it depends on no record, so it costs no privacy (see pipelines/training.py).

    ``personalize``: each silo keeps the model it trains in the last round (the global model of round
    ``rounds - 1`` fine-tuned on its own data, Wang et al. 2019, arXiv:1910.10252) as its personalized model, in
    its own folder, and reports that model's figures beside the final global model's. The model never leaves the
    silo, and its training is the last round's, already paid for in the silo's privacy ledger. With SGD, a silo
    with fewer training cases than ``batch_size`` fine-tunes (the last round, from round 2 on) at the learning rate
    times ``cases / batch_size`` (``pipelines.training.finetune_lr_scale``); that is also the update it sends.
    """

    local_epochs: int = 4
    batch_size: int = 32
    optimizer: OptimizerSpec = field(default_factory=OptimizerSpec)
    loss: str = "dice_ce"
    seed: int = 0
    fedprox_mu: float = 0.0
    personalize: bool = False


@dataclass(frozen=True)
class PrivacySpec:
    """DP-SGD settings for the whole plan (Abadi et al. 2016, arXiv:1607.00133).

    ``target_epsilon`` and ``target_delta`` bound what the plan spends at each silo over all
    its rounds; the noise multiplier is derived from them by the accountant.
    """

    enabled: bool = True
    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"


@dataclass(frozen=True)
class AggregationSpec:
    rule: str = "fedavg"
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerOptimizerSpec:
    """How the aggregated delta moves the global model: ``sgd`` (x += lr * delta), or the adaptive
    server optimizers ``adam`` / ``yogi`` of Reddi et al. 2021 ("Adaptive Federated Optimization",
    arXiv:2003.00295) with ``args`` beta1, beta2, tau."""

    name: str = "sgd"
    args: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FederationSpec:
    rounds: int = 3
    min_silos: int = 2
    aggregation: AggregationSpec = field(default_factory=AggregationSpec)
    server_lr: float = 1.0
    server_optimizer: ServerOptimizerSpec = field(default_factory=ServerOptimizerSpec)
    # L2 bound on each silo's delta (None: no bound); over it, the update is rejected or clipped.
    update_norm_bound: float | None = None
    update_norm_action: str = "reject"
    round_timeout_s: float = 600.0
    wait_for_silos_s: float = 120.0
    # How each update travels (float32, float16, int8, or top-k with error feedback kept at the silo).
    compression: str = "float32"
    topk_fraction: float = 0.01  # topk only: the share of the model's entries each update carries
    # "secagg+": the coordinator sees only the sum (each silo clips its update to update_norm_bound before masking).
    secure_aggregation: str = "none"


@dataclass(frozen=True)
class Plan:
    """A validated training plan. Build it with :func:`load_plan` or :func:`parse_plan`."""

    name: str
    task: str
    model: ModelSpec
    data: DataSpec = field(default_factory=DataSpec)
    training: TrainingSpec = field(default_factory=TrainingSpec)
    privacy: PrivacySpec = field(default_factory=PrivacySpec)
    federation: FederationSpec = field(default_factory=FederationSpec)
    metrics: tuple[str, ...] = ("loss", "dice")

    @property
    def spatial_dims(self) -> int:
        return 3 if self.task.endswith("3d") else 2

    @property
    def is_segmentation(self) -> bool:
        return self.task.startswith("seg")

    def to_dict(self) -> dict[str, Any]:
        """The normalized plan (defaults filled in) as plain data.

        Keys added to the schema after plans were first hashed (:data:`LATER_KEYS`) are left out while they
        hold their default, so that a plan written before them keeps its hash, and the approvals made for it.
        """
        out = _plain(asdict(self))
        for (section, key), default in LATER_KEYS.items():
            if out[section].get(key) == default:
                del out[section][key]
        return out

    def canonical_bytes(self) -> bytes:
        """Key order, comments and whitespace of the YAML do not matter; every value does.

        Sorted-key compact JSON of the normalized plan. (The audit log uses full RFC 8785;
        this module stays free of compliance imports, and plan values are ints, short
        decimals and strings, for which Python's JSON output is already stable.)
        """
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()

    def hash(self) -> str:
        """sha256 hex of :meth:`canonical_bytes`: the plan's identity."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# --- validation helpers -------------------------------------------------------------------


def _mapping(raw: Any, key: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise _fail(key, f"expected a mapping, got {type(raw).__name__}", f"write '{key}:' followed by indented 'name: value' lines")
    return raw


def _check_keys(raw: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in raw:
        if key not in allowed:
            prefix = f"{where}." if where else ""
            raise _fail(f"{prefix}{key}", "unknown key", f"use one of: {', '.join(allowed)}")


def _choice(raw: dict[str, Any], key: str, where: str, choices: tuple[str, ...], default: str | None = None) -> str:
    value = raw.get(key, default)
    if value is None:
        raise _fail(f"{where}.{key}" if where else key, "missing", f"set it to one of: {', '.join(choices)}")
    if value not in choices:
        raise _fail(f"{where}.{key}" if where else key, f"'{value}' is not allowed", f"use one of: {', '.join(choices)}")
    return value


def _number(raw: dict[str, Any], key: str, where: str, default: float, *, integer: bool = False,
            low: float | None = None, high: float | None = None, low_open: bool = False) -> Any:
    full = f"{where}.{key}"
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "a whole number" if integer else "a number"
        raise _fail(full, f"expected {kind}, got {value!r}", f"write {kind}, e.g. {default}")
    if not math.isfinite(value):
        raise _fail(full, f"{value} is not finite", f"use a finite number, e.g. {default}")
    if low is not None and (value <= low if low_open else value < low):
        bound = f"greater than {low}" if low_open else f"at least {low}"
        raise _fail(full, f"{value} is out of range", f"use a value {bound}")
    if high is not None and value > high:
        raise _fail(full, f"{value} is out of range", f"use a value of at most {high}")
    return int(value) if integer else float(value)


def _args(raw: Any, key: str) -> dict[str, Any]:
    args = _mapping(raw, key)
    for name, value in args.items():
        _data_only(value, f"{key}.{name}")
    return dict(args)


def _data_only(value: Any, key: str) -> None:
    """Plan arguments are numbers, strings, booleans and lists of them: never code."""
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _data_only(item, f"{key}[{i}]")
        return
    if isinstance(value, str) and (value.startswith("$") or "_target_" in value):
        raise _fail(key, "expressions are not allowed in a plan", "give a literal value")
    if value is not None and not isinstance(value, (bool, int, float, str)):
        raise _fail(key, f"expected a number, string or list, got {type(value).__name__}", "give a literal value")


# --- sections -----------------------------------------------------------------------------


def _parse_model(raw: Any) -> ModelSpec:
    from pipelines.networks import NETWORKS  # local import: the registry pulls in MONAI

    m = _mapping(raw, "model")
    _check_keys(m, ("network", "args"), "model")
    network = _choice(m, "network", "model", tuple(NETWORKS))
    return ModelSpec(network=network, args=_args(m.get("args"), "model.args"))


def _parse_data(raw: Any) -> DataSpec:
    from pipelines.transforms import TRANSFORMS

    d = _mapping(raw, "data")
    _check_keys(d, ("dataset", "transforms", "num_classes", "cache"), "data")
    dataset = d.get("dataset", "default")
    if not isinstance(dataset, str) or not dataset.replace("-", "").replace("_", "").isalnum():
        raise _fail("data.dataset", f"{dataset!r} is not a dataset name", "use letters, digits, '-' and '_'")
    items = d.get("transforms") or []
    if not isinstance(items, list):
        raise _fail("data.transforms", "expected a list", "write one '- name: X' entry per transform")
    transforms = []
    for i, item in enumerate(items):
        where = f"data.transforms[{i}]"
        t = _mapping(item, where)
        _check_keys(t, ("name", "args"), where)
        transforms.append(TransformSpec(name=_choice(t, "name", where, tuple(TRANSFORMS)), args=_args(t.get("args"), f"{where}.args")))
    num_classes = _number(d, "num_classes", "data", 2, integer=True, low=2, high=1000)
    cache = d.get("cache", True)
    if not isinstance(cache, bool):
        raise _fail("data.cache", f"expected true or false, got {cache!r}", "write true or false")
    return DataSpec(dataset=dataset, transforms=tuple(transforms), num_classes=num_classes, cache=cache)


def _parse_training(raw: Any, task: str) -> TrainingSpec:
    t = _mapping(raw, "training")
    _check_keys(t, ("local_epochs", "batch_size", "optimizer", "loss", "seed", "fedprox_mu", "personalize"), "training")
    o = _mapping(t.get("optimizer"), "training.optimizer")
    _check_keys(o, ("name", "lr", "momentum", "weight_decay"), "training.optimizer")
    optimizer = OptimizerSpec(
        name=_choice(o, "name", "training.optimizer", OPTIMIZERS, "sgd"),
        lr=_number(o, "lr", "training.optimizer", 0.5, low=0, low_open=True, high=100),
        momentum=_number(o, "momentum", "training.optimizer", 0.9, low=0, high=0.999),
        weight_decay=_number(o, "weight_decay", "training.optimizer", 0.0, low=0, high=1),
    )
    default_loss = "dice_ce" if task.startswith("seg") else "cross_entropy"
    loss = _choice(t, "loss", "training", LOSSES, default_loss)
    if task.startswith("cls") and loss != "cross_entropy":
        raise _fail("training.loss", f"'{loss}' is a segmentation loss", "use cross_entropy for a classification task")
    if task.startswith("seg") and loss == "cross_entropy":
        raise _fail("training.loss", "cross_entropy is for classification", "use dice, dice_ce or bce for segmentation")
    return TrainingSpec(
        local_epochs=_number(t, "local_epochs", "training", 4, integer=True, low=1, high=1000),
        batch_size=_number(t, "batch_size", "training", 32, integer=True, low=1, high=4096),
        optimizer=optimizer,
        loss=loss,
        seed=_number(t, "seed", "training", 0, integer=True, low=0),
        fedprox_mu=_number(t, "fedprox_mu", "training", 0.0, low=0, high=100),
        personalize=_boolean(t, "personalize", "training", False),
    )


def _parse_privacy(raw: Any) -> PrivacySpec:
    p = _mapping(raw, "privacy")
    _check_keys(p, ("enabled", "target_epsilon", "target_delta", "max_grad_norm", "accountant"), "privacy")
    enabled = p.get("enabled", True)
    if not isinstance(enabled, bool):
        raise _fail("privacy.enabled", f"expected true or false, got {enabled!r}", "write true or false")
    return PrivacySpec(
        enabled=enabled,
        target_epsilon=_number(p, "target_epsilon", "privacy", 8.0, low=0, low_open=True, high=100),
        target_delta=_number(p, "target_delta", "privacy", 1e-5, low=0, low_open=True, high=0.1),
        max_grad_norm=_number(p, "max_grad_norm", "privacy", 1.0, low=0, low_open=True, high=1e6),
        accountant=_choice(p, "accountant", "privacy", ACCOUNTANTS, "rdp"),
    )


def _parse_federation(raw: Any) -> FederationSpec:
    f = _mapping(raw, "federation")
    _check_keys(f, ("rounds", "min_silos", "aggregation", "server_lr", "server_optimizer", "update_norm_bound", "update_norm_action",
                    "round_timeout_s", "wait_for_silos_s", "compression", "topk_fraction", "secure_aggregation"), "federation")
    a = _mapping(f.get("aggregation"), "federation.aggregation")
    _check_keys(a, ("rule", "args"), "federation.aggregation")
    aggregation = AggregationSpec(
        rule=_choice(a, "rule", "federation.aggregation", AGGREGATION_RULES, "fedavg"),
        args=_args(a.get("args"), "federation.aggregation.args"),
    )
    o = _mapping(f.get("server_optimizer"), "federation.server_optimizer")
    _check_keys(o, ("name", "args"), "federation.server_optimizer")
    server_optimizer = ServerOptimizerSpec(
        name=_choice(o, "name", "federation.server_optimizer", SERVER_OPTIMIZERS, "sgd"),
        args=_args(o.get("args"), "federation.server_optimizer.args"),
    )
    bound = f.get("update_norm_bound")
    if bound is not None:
        bound = _number(f, "update_norm_bound", "federation", 10.0, low=0, low_open=True)
    compression = _choice(f, "compression", "federation", COMPRESSIONS, "float32")
    if "topk_fraction" in f and compression != "topk":
        raise _fail("federation.topk_fraction", f"is used only with compression: topk (this plan has {compression})",
                    "remove topk_fraction, or set compression: topk")
    secure = _choice(f, "secure_aggregation", "federation", SECURE_AGGREGATION, "none")
    min_silos = _number(f, "min_silos", "federation", 2, integer=True, low=1, high=10000)
    if secure != "none":
        _check_secure(secure, aggregation.rule, bound, min_silos, compression)
    return FederationSpec(
        rounds=_number(f, "rounds", "federation", 3, integer=True, low=1, high=10000),
        min_silos=min_silos,
        aggregation=aggregation,
        server_lr=_number(f, "server_lr", "federation", 1.0, low=0, low_open=True, high=100),
        server_optimizer=server_optimizer,
        update_norm_bound=bound,
        update_norm_action=_choice(f, "update_norm_action", "federation", NORM_ACTIONS, "reject"),
        round_timeout_s=_number(f, "round_timeout_s", "federation", 600.0, low=1),
        wait_for_silos_s=_number(f, "wait_for_silos_s", "federation", 120.0, low=1),
        compression=compression,
        topk_fraction=_number(f, "topk_fraction", "federation", 0.01, low=0, low_open=True, high=1),
        secure_aggregation=secure,
    )


def _check_secure(secure: str, rule: str, bound: float | None, min_silos: int, compression: str) -> None:
    """What secure aggregation rules out, each refusal saying why and what is possible instead."""
    key = "federation.secure_aggregation"
    if rule not in SECURE_RULES:
        raise _fail(key, f"{secure} hides individual updates, and rule '{rule}' needs them (it compares or clips each silo's update "
                    "at the coordinator)", "use aggregation rule fedavg (the weighted mean; each silo clips its own update to "
                    "update_norm_bound before masking), or drop secure_aggregation to keep a robust rule")
    if bound is None:
        raise _fail(key, f"{secure} needs federation.update_norm_bound: the coordinator cannot check a masked update, so each silo "
                    "clips its own to that bound before masking", "set federation.update_norm_bound, e.g. 10.0")
    if min_silos < 3:
        raise _fail(key, f"{secure} with min_silos {min_silos}: with two silos each one can subtract its own update from the sum "
                    "and read the other's", "set federation.min_silos to 3 or more")
    if compression != "float32":
        raise _fail(key, f"{secure} with compression {compression}: masking turns every entry into a dense 32-bit integer, so "
                    "compression would save nothing", "remove federation.compression (float32), or drop secure_aggregation")


PLAN_KEYS = ("name", "task", "model", "data", "training", "privacy", "federation", "metrics")


def parse_plan(raw: Any) -> Plan:
    """Validate a plan given as plain data (the result of ``yaml.safe_load``)."""
    if not isinstance(raw, dict):
        raise ConfigError("a plan must be a YAML mapping", fix="start from configs/plans/seg3d-unet-dp.yaml")
    _check_keys(raw, PLAN_KEYS, "")
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise _fail("name", "missing or empty", "give the plan a short name, e.g. name: seg3d-unet-dp")
    task = _choice(raw, "task", "", TASKS)
    metrics = raw.get("metrics", ["loss", "dice"] if task.startswith("seg") else ["loss", "accuracy", "auc"])
    if not isinstance(metrics, list) or not metrics:
        raise _fail("metrics", "expected a non-empty list", f"list some of: {', '.join(METRICS)}")
    for m in metrics:
        if m not in METRICS:
            raise _fail("metrics", f"'{m}' is not a known metric", f"use some of: {', '.join(METRICS)}")
    plan = Plan(
        name=name.strip(),
        task=task,
        model=_parse_model(raw.get("model")),
        data=_parse_data(raw.get("data")),
        training=_parse_training(raw.get("training"), task),
        privacy=_parse_privacy(raw.get("privacy")),
        federation=_parse_federation(raw.get("federation")),
        metrics=tuple(metrics),
    )
    from pipelines.networks import check_model_spec

    check_model_spec(plan)
    return plan


def parse_plan_text(text: str, *, source: str = "plan") -> Plan:
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source} is not valid YAML{where}", fix="check the indentation and quoting there") from None
    return parse_plan(raw)


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"no plan file at {p}", fix="give the path of a plan YAML, e.g. configs/plans/seg3d-unet-dp.yaml")
    return parse_plan_text(p.read_text(encoding="utf-8"), source=str(p))


# --- the schema reference (docs/plan-schema.md is generated from this; a test keeps them equal) --------------

_CHOICES = {
    "task": TASKS, "training.optimizer.name": OPTIMIZERS, "training.loss": LOSSES, "privacy.accountant": ACCOUNTANTS,
    "metrics": METRICS, "federation.aggregation.rule": AGGREGATION_RULES, "federation.server_optimizer.name": SERVER_OPTIMIZERS,
    "federation.update_norm_action": NORM_ACTIONS, "federation.compression": COMPRESSIONS,
    "federation.secure_aggregation": SECURE_AGGREGATION,
}


def schema_reference() -> str:
    """The plan schema as Markdown: every key with its type, default and allowed values, from the dataclasses."""
    from dataclasses import MISSING, fields, is_dataclass
    from typing import get_type_hints

    from pipelines.networks import NETWORKS
    from pipelines.transforms import TRANSFORMS

    choices = {**_CHOICES, "model.network": tuple(sorted(NETWORKS)), "data.transforms[].name": tuple(TRANSFORMS)}
    rows: list[tuple[str, str, str, str]] = []

    def walk(cls: type, prefix: str) -> None:
        hints = get_type_hints(cls)
        for f in fields(cls):
            key = f"{prefix}{f.name}"
            kind = hints[f.name]
            if f.default is not MISSING:
                default = f.default
            elif f.default_factory is not MISSING:
                default = f.default_factory()
            else:
                default = MISSING
            if is_dataclass(kind):
                walk(kind, key + ".")
                continue
            if key == "data.transforms":
                walk(TransformSpec, key + "[].")
                continue
            type_text = str(kind).replace("typing.", "").replace(" | ", " or ") if not isinstance(kind, type) else kind.__name__
            type_text = {"dict[str, Any]": "mapping", "tuple[str, ...]": "list of str", "float or None": "float or null"}.get(type_text, type_text)
            default_text = "required" if default is MISSING else json.dumps(default if not isinstance(default, tuple) else list(default))
            rows.append((key, type_text, default_text, ", ".join(choices.get(key, ())) or "-"))

    walk(Plan, "")
    lines = ["# Plan schema reference", "",
             "Generated from `pipelines/plan.py` by `fedsilo plan schema` (do not edit by hand). Unknown keys are errors;",
             "each error names the key and the fix. `args` take numbers, strings, booleans and lists of them only.", "",
             "| key | type | default | allowed |", "| --- | --- | --- | --- |"]
    lines += [f"| `{k}` | {t} | `{d}` | {a} |" for k, t, d, a in rows]
    return "\n".join(lines) + "\n"
