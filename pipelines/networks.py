"""The allow-list of MONAI networks a plan may name, made Opacus-compatible.

A plan never instantiates arbitrary classes: it names one of :data:`NETWORKS`, whose entry
says which keyword arguments it accepts, which it fixes (no pretrained weights are fetched:
silos are offline), and which Opacus grad-sample mode works for it (measured on CPU with
Opacus 1.6 and MONAI 1.6, see ../shared/STACK.md):

- BatchNorm mixes samples and breaks per-sample gradients: ``ModuleValidator.fix`` replaces it
  with GroupNorm (DenseNet121, EfficientNetBN).
- In-place activations break Opacus' backward hooks ("Output 0 of BackwardHookFunction is a
  view and is being modified inplace"): every ``inplace`` flag is turned off.
- Residual adds (``x += residual``) still fail in hooks mode; SegResNet uses ``ew``
  (expanded weights). UNet's PReLU works in hooks mode, not in ``ew``.
- Among the modes that work, each network takes the fastest measured one (the table above
  :data:`NETWORKS`); ``ghost`` (ghost clipping) is supported by ``pipelines.training`` too.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedsilo.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from pipelines.plan import Plan


@dataclass(frozen=True)
class NetworkEntry:
    """How to build one allow-listed network.

    Args:
        cls_name: class name in ``monai.networks.nets``.
        grad_sample_mode: the Opacus mode that works for it (see module docstring).
        tasks: the plan tasks it serves ("seg" or "cls").
        fixed: arguments fedsilo sets and a plan may not override.
        out_arg: the name of its output-channel argument.
    """

    cls_name: str
    grad_sample_mode: str
    tasks: tuple[str, ...]
    fixed: dict[str, Any] = field(default_factory=dict)
    out_arg: str = "out_channels"


# Why each grad_sample_mode: the fastest mode that works, from `fedsilo bench dp` on the shared 2-core CPU machine
# (DP step time / non-private step time, batch 8/16/32, 32^3 inputs, BENCH_PLANS' arguments; "x": fails).
#
# | network        | hooks           | functorch       | ew            | ghost           | chosen    | measured        |
# | UNet           | 1.56/1.36/1.43  | 2.64/2.39/2.02  | x (PReLU)     | 2.08/2.19/2.09  | hooks     | 2026-11-27 (1)  |
# | BasicUNet      | 1.66            | 2.19            | x (ConvT)     | 2.55            | hooks     | 2026-11-27 (4)  |
# | SegResNet      | x (x += res)    | x (x += res)    | 1.05          | -               | ew        | previous run (2)|
# | DenseNet121    | 2.28            | x at 32^3 (3)   | x             | 2.83            | hooks     | 2026-11-27 (4)  |
# | EfficientNetBN | 32              | 2.3             | -             | -               | functorch | previous run (2)|
#
# (1) timed interleaved in one process (every mode's step in turn, median of 7), quiet machine (load under 1), with
#     fedsilo's per-sample gradient samplers (pipelines.grad_samplers: conv and transposed conv as one grouped
#     convolution, PReLU in closed form); extra peak memory hooks 1.04-1.05x. With Opacus' own samplers, an hour
#     earlier on the same quiet machine: hooks 2.43/2.31/2.11, functorch 2.38/2.19/2.10, ghost 3.06/2.85/2.86.
# (2) an earlier session's sequential `fedsilo bench dp` (means over batch 8/16/32), before pipelines.grad_samplers,
#     not re-measured (hooks uses the new samplers for their convolutions; the other modes do not).
# (3) functorch leaves DenseNet's last GroupNorm one value per group at 32^3, which torch refuses.
# (4) batch 8 only, interleaved, median of 5, quiet machine, with pipelines.grad_samplers (BasicUNet was functorch
#     until then: hooks fell back to functorch for its transposed convolutions, 4.5x); extra peak memory hooks
#     0.88x (BasicUNet) and 1.14x (DenseNet121).
NETWORKS: dict[str, NetworkEntry] = {
    "UNet": NetworkEntry("UNet", "hooks", ("seg",)),
    "BasicUNet": NetworkEntry("BasicUNet", "hooks", ("seg",)),
    "SegResNet": NetworkEntry("SegResNet", "ew", ("seg",)),
    "DenseNet121": NetworkEntry("DenseNet121", "hooks", ("cls",), fixed={"pretrained": False}),
    "EfficientNetBN": NetworkEntry(
        "EfficientNetBN", "functorch", ("cls",), fixed={"pretrained": False}, out_arg="num_classes"
    ),
}


def _network_class(entry: NetworkEntry) -> type:
    import monai.networks.nets as nets

    return getattr(nets, entry.cls_name)


def network_kwargs(plan: "Plan") -> dict[str, Any]:
    """The constructor arguments for the plan's network: plan args plus task-derived ones."""
    entry = NETWORKS[plan.model.network]
    kwargs: dict[str, Any] = {"spatial_dims": plan.spatial_dims, "in_channels": 1}
    # Binary segmentation: one logit channel (sigmoid); classification: one logit per class.
    kwargs[entry.out_arg] = 1 if plan.is_segmentation else plan.data.num_classes
    kwargs.update(plan.model.args)
    kwargs.update(entry.fixed)
    return kwargs


def check_model_spec(plan: "Plan") -> None:
    """Refuse a network that does not fit the task, or arguments it does not take."""
    entry = NETWORKS[plan.model.network]
    kind = plan.task[:3]
    if kind not in entry.tasks:
        fitting = [name for name, e in NETWORKS.items() if kind in e.tasks]
        raise ConfigError(
            f"plan key 'model.network': {plan.model.network} does not do {plan.task}",
            fix=f"use one of: {', '.join(fitting)}",
        )
    params = inspect.signature(_network_class(entry)).parameters
    accepted = [p for p in params if p not in entry.fixed and p != "kwargs"]
    for key in plan.model.args:
        if key in entry.fixed:
            raise ConfigError(f"plan key 'model.args.{key}': fedsilo sets this for {plan.model.network}", fix=f"remove '{key}'")
        if key not in params or key == "kwargs":
            raise ConfigError(
                f"plan key 'model.args.{key}': {plan.model.network} has no argument '{key}'",
                fix=f"use some of: {', '.join(accepted)}",
            )
    spatial = plan.model.args.get("spatial_dims")
    if spatial is not None and spatial != plan.spatial_dims:
        raise ConfigError(
            f"plan key 'model.args.spatial_dims': {spatial} does not match task {plan.task}",
            fix=f"remove it or set it to {plan.spatial_dims}",
        )


def build_network(plan: "Plan", *, seed: int | None = None) -> "torch.nn.Module":
    """Build the plan's network, Opacus-compatible when the plan uses DP.

    Args:
        plan: a validated plan.
        seed: seeds torch before building, so every party builds the same initial weights.
    """
    import torch

    entry = NETWORKS[plan.model.network]
    if seed is not None:
        torch.manual_seed(seed)
    try:
        model = _network_class(entry)(**network_kwargs(plan))
    except (TypeError, ValueError, AssertionError) as exc:
        raise ConfigError(
            f"plan key 'model.args': {plan.model.network} cannot be built with these arguments ({type(exc).__name__}: {str(exc)[:160]})",
            fix="check the argument values against the MONAI documentation of this network",
        ) from None
    return make_private_compatible(model)


def make_private_compatible(model: "torch.nn.Module") -> "torch.nn.Module":
    """Replace BatchNorm (ModuleValidator.fix) and turn off in-place operations; fedsilo's per-sample gradient
    samplers for the networks' layers (pipelines.grad_samplers) are registered with Opacus on the way, since the
    modes in :data:`NETWORKS` were chosen with them."""
    from opacus.validators import ModuleValidator

    import pipelines.grad_samplers  # noqa: F401 - registration on import

    if ModuleValidator.validate(model, strict=False):
        model = ModuleValidator.fix(model)
    for module in model.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    return model


def grad_sample_mode(plan: "Plan") -> str:
    return NETWORKS[plan.model.network].grad_sample_mode
