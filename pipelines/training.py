"""Local training, with or without DP-SGD, and the privacy accounting that goes with it.

DP-SGD (Abadi et al. 2016, "Deep Learning with Differential Privacy", arXiv:1607.00133)
through Opacus: per-sample gradients clipped to ``max_grad_norm``, Gaussian noise of
``noise_multiplier * max_grad_norm`` added, Poisson-sampled batches. The noise multiplier is
chosen once for the whole plan (all rounds times all local epochs) so that the plan's target
epsilon is reached at its last round. The accountant's history is carried across rounds (and
plans) by the caller, so the epsilon reported is the composition of everything the dataset
has spent, computed by the accountant (RDP: Mironov 2017, arXiv:1702.07476; PRV: Gopi et al.
2021, arXiv:2106.02848), not a sum.
"""

from __future__ import annotations

import functools
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fedsilo.errors import ConfigError, PrivacyBudgetError
from pipelines.dataset import CaseArrays
from pipelines.networks import grad_sample_mode
from pipelines.plan import Plan

# The first layer's input needs no gradient; PyTorch says so on every Opacus backward hook. Harmless.
warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)

# One accountant step record: (noise_multiplier, sample_rate, steps), Opacus' own history format.
HistoryEntry = tuple[float, float, int]


class CaseDataset(Dataset):
    """Cases held in memory; random (augmentation) transforms applied per access."""

    def __init__(self, arrays: CaseArrays, *, segmentation: bool, random_transform: Callable[[dict], dict] | None = None) -> None:
        self.images = torch.from_numpy(arrays.images)
        self.labels = torch.from_numpy(arrays.labels)
        self.segmentation = segmentation
        self.random_transform = random_transform

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.images[i], self.labels[i]
        if self.random_transform is not None:
            item = {"image": image, "label": label} if self.segmentation else {"image": image}
            item = self.random_transform(item)
            image = torch.as_tensor(np.asarray(item["image"]), dtype=torch.float32)
            if self.segmentation:
                label = torch.as_tensor(np.asarray(item["label"]), dtype=torch.float32)
        return image, label


@dataclass(frozen=True)
class PrivacyReport:
    """What one round of DP-SGD spent, and the composed total for the dataset."""

    accountant: str
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    delta: float
    epsilon: float  # composed over the dataset's whole history, this round included

    @property
    def entry(self) -> HistoryEntry:
        """This round's accountant record, to append to the dataset's history."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class TrainResult:
    state_dict: dict[str, torch.Tensor]
    num_examples: int
    train_loss: float
    seconds: float
    privacy: PrivacyReport | None = None
    extra: dict[str, float] = field(default_factory=dict)


def make_loss(plan: Plan) -> torch.nn.Module:
    from monai.losses import DiceCELoss, DiceLoss

    if plan.training.loss == "dice":
        return DiceLoss(sigmoid=True)
    if plan.training.loss == "dice_ce":
        return DiceCELoss(sigmoid=True)
    if plan.training.loss == "bce":
        return torch.nn.BCEWithLogitsLoss()
    return torch.nn.CrossEntropyLoss()


class PerSampleLoss(torch.nn.Module):
    """A loss reducible per sample, as Opacus' ghost clipping (``grad_sample_mode="ghost"``) wants it.

    ``reduction="none"`` gives one value per sample (``[B]``, the mean of the inner loss's unreduced values of
    that sample); "mean"/"sum" reduce those. The inner loss runs unreduced (MONAI's DiceLoss with
    ``reduction="none"`` keeps singleton spatial dimensions, which would broadcast wrongly against Opacus'
    ``[B]`` clipping coefficients: hence the reshape).
    """

    def __init__(self, inner: torch.nn.Module, reduction: str = "mean") -> None:
        super().__init__()
        self.inner = inner
        self.inner.reduction = "none"
        self.reduction = reduction

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_sample = self.inner(output, target).reshape(output.shape[0], -1).mean(dim=1)
        if self.reduction == "none":
            return per_sample
        return per_sample.sum() if self.reduction == "sum" else per_sample.mean()


def make_optimizer(plan: Plan, params) -> torch.optim.Optimizer:
    o = plan.training.optimizer
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay)
    return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def sample_rate(plan: Plan, num_examples: int) -> float:
    """Poisson sampling rate as Opacus sets it: 1 / (batches per epoch of the plain loader)."""
    return 1.0 / math.ceil(num_examples / plan.training.batch_size)


def plan_noise_multiplier(plan: Plan, num_examples: int, *, cache_dir: Path | None = None) -> float:
    """The noise multiplier that spends the plan's target epsilon over all its rounds.

    With ``cache_dir`` (a silo's cache folder) the answer is also kept on disk, for the next process: a silo
    handles each message in a fresh process, and the search costs seconds per round (see
    :func:`_noise_multiplier`). A remembered value is used only after checking it: the plan's whole run at that
    noise must not spend more than the target epsilon (one accountant evaluation instead of a whole search).
    """
    p = plan.privacy
    epochs = plan.federation.rounds * plan.training.local_epochs
    key = (float(p.target_epsilon), float(p.target_delta), sample_rate(plan, num_examples), epochs, p.accountant)
    try:
        if cache_dir is None:
            return _noise_multiplier(*key)
        return _remembered_noise_multiplier(key, Path(cache_dir))
    except ValueError as exc:
        raise PrivacyBudgetError(
            f"no noise level reaches epsilon {p.target_epsilon} with {num_examples} cases over {epochs} epochs ({exc})",
            fix="raise privacy.target_epsilon, add cases, or lower rounds/local_epochs",
        ) from None


@functools.lru_cache(maxsize=256)
def _noise_multiplier(target_epsilon: float, target_delta: float, rate: float, epochs: int, accountant: str) -> float:
    """Opacus' bisection (``get_noise_multiplier``), remembered per process: with RDP each probe evaluates the
    Renyi divergence at ~150 orders, in pure Python for the fractional ones (seconds per search on one core),
    and the answer depends only on these five numbers."""
    from opacus.accountants.utils import get_noise_multiplier

    # steps, not epochs: Opacus turns epochs into int(epochs / rate) steps, and the float division can land one
    # step short of the plan's rounds * local_epochs * batches (e.g. 3 epochs of 75 batches: 224, not 225).
    return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=rate,
                                      steps=plan_steps(epochs, rate), accountant=accountant))


def plan_steps(epochs: int, rate: float) -> int:
    """DP-SGD steps of ``epochs`` at sample rate ``rate`` = 1 / batches per epoch (exact: rate is 1 / an integer)."""
    return epochs * round(1.0 / rate)


NOISE_CACHE_FILE = "noise-multipliers.json"


def _remembered_noise_multiplier(key: tuple[float, float, float, int, str], cache_dir: Path) -> float:
    """:func:`_noise_multiplier` through ``cache_dir/noise-multipliers.json``, each entry checked before use."""
    import json
    import os

    import opacus

    target_epsilon, target_delta, rate, epochs, accountant = key
    name = f"{opacus.__version__}|{accountant}|{target_epsilon!r}|{target_delta!r}|{rate!r}|{epochs}"
    path = cache_dir / NOISE_CACHE_FILE
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
        entries = entries if isinstance(entries, dict) else {}
    except (OSError, ValueError):
        entries = {}
    remembered = entries.get(name)
    if isinstance(remembered, float) and math.isfinite(remembered) and remembered > 0:
        spent = composed_epsilon([(remembered, rate, plan_steps(epochs, rate))], delta=target_delta, accountant=accountant)
        if spent <= target_epsilon:
            return remembered
    sigma = _noise_multiplier(*key)
    entries[name] = sigma
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(entries, indent=1, sort_keys=True), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:  # a read-only cache only costs the next process the search again
        pass
    return sigma


def planned_round_entry(plan: Plan, num_examples: int, *, cache_dir: Path | None = None) -> HistoryEntry:
    """The accountant record one round of this plan will add at most (every batch taking a step).

    Poisson sampling can draw empty batches, which take no step, so the real round spends at most this:
    a budget check made with it before training errs on the safe side.
    """
    rate = sample_rate(plan, num_examples)
    steps = plan.training.local_epochs * math.ceil(num_examples / plan.training.batch_size)
    return (plan_noise_multiplier(plan, num_examples, cache_dir=cache_dir), rate, steps)


def composed_epsilon(history: Sequence[HistoryEntry], *, delta: float, accountant: str) -> float:
    """Epsilon of a whole accountant history at ``delta`` (0.0 for an empty history).

    RDP (Mironov 2017, arXiv:1702.07476, Prop. 1: RDP composes by addition): the per-step RDP curve of each
    (noise multiplier, sample rate) is computed once per process (:func:`_rdp_per_step`) and scaled by the steps,
    the same sums Opacus' ``RDPAccountant.get_privacy_spent`` makes, so the value is Opacus' own. PRV and GDP go
    through Opacus' accountant as they are.
    """
    from opacus.accountants import create_accountant

    if not history:
        return 0.0
    if accountant == "rdp":
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis.rdp import get_privacy_spent

        rdp = sum(np.asarray(_rdp_per_step(float(nm), float(rate))) * int(steps) for nm, rate, steps in history)
        eps, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(eps)
    acc = create_accountant(mechanism=accountant)
    acc.history = [tuple(h) for h in history]
    return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(noise_multiplier: float, rate: float) -> tuple[float, ...]:
    """RDP of one step of the subsampled Gaussian mechanism at Opacus' default orders (Mironov et al. 2019,
    arXiv:1908.10530), remembered per process: every round of a run repeats the same few (sigma, q) pairs."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    return tuple(float(x) for x in compute_rdp(q=rate, noise_multiplier=noise_multiplier, steps=1,
                                                orders=RDPAccountant.DEFAULT_ALPHAS))


def add_proximal_term(optimizer: torch.optim.Optimizer, model: torch.nn.Module, mu: float,
                      anchor: Mapping[str, Any] | None = None) -> None:
    """FedProx (Li et al. 2020, arXiv:1812.06127, eq. 2): local objective ``loss + mu/2 * ||w - w_global||^2``.

    ``w_global`` is ``anchor`` (parameter name -> array or tensor) or, by default, ``model``'s weights now (the
    round's global model). Ditto's personal objective (Li et al. 2021, arXiv:2012.04221) is the same term with the
    anchor the round's global model while training a personal model from elsewhere. The term's gradient
    ``mu * (w - w_global)`` is added to every parameter's gradient just before each step of ``optimizer``
    (a step pre-hook), not to the loss: under DP-SGD, Opacus' optimizer replaces ``p.grad`` with the clipped,
    noised per-sample sum, and per-sample gradients come from the layers' activations, so a loss term on the
    weights would be silently dropped. A pre-hook on the plain optimizer runs after Opacus has clipped and
    noised (its ``DPOptimizer.step`` calls the wrapped optimizer's ``step``), so the term is added as it is
    in non-private training, unclipped and un-noised: it depends on no record (only on weights that are
    already the output of the DP mechanism and on the global model), so it costs no privacy (post-processing).
    Register the hook before ``PrivacyEngine.make_private`` wraps the optimizer.
    """
    anchors = [(p, p.detach().clone() if anchor is None else torch.as_tensor(anchor[name], dtype=p.dtype, device=p.device).clone())
               for name, p in model.named_parameters() if p.requires_grad]

    def hook(_optimizer, _args, _kwargs) -> None:
        with torch.no_grad():
            for p, anchor in anchors:
                if p.grad is not None:
                    p.grad.add_(p - anchor, alpha=mu)

    optimizer.register_step_pre_hook(hook)


def finetune_lr_scale(num_examples: int, batch_size: int) -> float:
    """The learning rate of fine-tuning a trained model at a silo, as a factor of the plan's: ``min(1, n / B)``.

    A silo with fewer cases ``n`` than the minibatch ``B`` takes its whole data as one batch (under DP: Poisson
    rate 1, expected batch ``n``), and its step, the mean gradient, weighs each case ``1 / n`` rather than
    ``1 / B``; under DP its noise per step is ``sigma * clip / n``. Scaling the rate by ``n / B`` (the linear
    scaling rule, Goyal et al. 2017, arXiv:1706.02677) gives every case at every silo the same pull, ``lr / B``,
    and takes a small silo's noisy steps down with it. It is for fine-tuning only, which starts from a trained
    global model that a few large, noisy steps on 16 cases throw away (``fedsilo bench utility``, seeds 10..13,
    eps=8: the 16-case silo's personalized Dice .709 at the plan's rate, .778 scaled; docs/benchmarks.md);
    training from initial weights wants the full rate (local only at that silo: .683 unscaled, .491 scaled)."""
    if num_examples < 0 or batch_size < 1:
        raise ValueError(f"finetune_lr_scale({num_examples}, {batch_size}): cases must be >= 0 and the batch >= 1")
    return min(1.0, num_examples / batch_size)


def _loader(dataset: Dataset, plan: Plan, seed: int) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=plan.training.batch_size, shuffle=True, generator=g, drop_last=False)


def train_local(
    model: torch.nn.Module,
    data: CaseArrays,
    plan: Plan,
    *,
    history: Sequence[HistoryEntry] = (),
    noise_multiplier: float | None = None,
    random_transform: Callable[[dict], dict] | None = None,
    epochs: int | None = None,
    private: bool | None = None,
    seed: int = 0,
    on_epoch: Callable[[int, float], None] | None = None,
    fedprox_mu: float | None = None,
    proximal_anchor: Mapping[str, Any] | None = None,
    lr_scale: float = 1.0,
) -> TrainResult:
    """Train ``model`` in place on ``data`` for the plan's local epochs.

    Args:
        model: an Opacus-compatible network (``pipelines.networks.build_network``).
        data: the training cases.
        plan: the validated plan (optimizer, loss, DP settings).
        history: the dataset's accountant history before this round (DP only).
        noise_multiplier: override the plan-derived noise multiplier (DP only).
        random_transform: augmentation applied per sample.
        epochs: override ``plan.training.local_epochs`` (e.g. the pooled baseline).
        private: override ``plan.privacy.enabled``.
        seed: seeds batch order and noise.
        on_epoch: called with (epoch, mean loss) after each epoch.
        fedprox_mu: override ``plan.training.fedprox_mu`` (FedProx's proximal weight; 0: none). The
            proximal anchor is ``model``'s weights as passed in (the global model of the round), or
        proximal_anchor: these weights (parameter name -> array), e.g. Ditto's global model while a personal
            model trains.
        lr_scale: multiply the plan's learning rate by this (> 0), e.g. :func:`finetune_lr_scale` when
            fine-tuning a trained model.
    """
    if len(data) == 0:
        raise ConfigError("no training cases", fix="register a dataset with training cases")
    torch.manual_seed(seed)
    private = plan.privacy.enabled if private is None else private
    epochs = plan.training.local_epochs if epochs is None else epochs
    dataset = CaseDataset(data, segmentation=plan.is_segmentation, random_transform=random_transform)
    loader = _loader(dataset, plan, seed)
    model.train()
    if not (lr_scale > 0 and math.isfinite(lr_scale)):
        raise ValueError(f"lr_scale {lr_scale!r} must be a positive number")
    optimizer = make_optimizer(plan, model.parameters())
    for group in optimizer.param_groups:
        group["lr"] *= lr_scale
    mu = plan.training.fedprox_mu if fedprox_mu is None else fedprox_mu
    if mu < 0:
        raise ConfigError(f"fedprox_mu {mu} is negative", fix="use 0 (FedAvg) or a positive proximal weight")
    if mu > 0:
        add_proximal_term(optimizer, model, mu, proximal_anchor)
    loss_fn = make_loss(plan)
    engine = None
    start = time.perf_counter()
    if private:
        from opacus import PrivacyEngine

        if noise_multiplier is None:
            noise_multiplier = plan_noise_multiplier(plan, len(data))
        mode = grad_sample_mode(plan)
        with warnings.catch_warnings():
            # Opacus warns that secure_mode is off (CPU RNG), when the engine is built and again when it wraps:
            # accepted for this toolkit's threat model.
            warnings.simplefilter("ignore", UserWarning)
            engine = PrivacyEngine(accountant=plan.privacy.accountant)
            engine.accountant.history = [tuple(h) for h in history]
            common = dict(module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=noise_multiplier,
                          max_grad_norm=plan.privacy.max_grad_norm, poisson_sampling=True, grad_sample_mode=mode)
            if mode == "ghost":
                # Ghost clipping: per-sample gradient norms only, then a second backward pass on the loss
                # reweighted by the clipping coefficients; the returned criterion does both in .backward().
                model, optimizer, loss_fn, loader = engine.make_private(criterion=PerSampleLoss(loss_fn), **common)
            else:
                model, optimizer, loader = engine.make_private(**common)
    losses: list[float] = []
    for epoch in range(epochs):
        epoch_losses = []
        for images, labels in loader:
            if images.shape[0] == 0:  # Poisson sampling can draw an empty batch
                continue
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(images), labels)
            loss.backward()
            optimizer.step()
            epoch_losses.append(float(loss.detach()))
        mean = float(np.mean(epoch_losses)) if epoch_losses else math.nan
        losses.append(mean)
        if on_epoch:
            on_epoch(epoch + 1, mean)
    seconds = time.perf_counter() - start
    inner = model._module if engine is not None else model
    state = {k: v.detach().clone() for k, v in inner.state_dict().items()}
    report = None
    if engine is not None:
        steps_total = sum(int(h[2]) for h in engine.accountant.history)
        report = PrivacyReport(
            accountant=plan.privacy.accountant,
            noise_multiplier=float(noise_multiplier),
            max_grad_norm=plan.privacy.max_grad_norm,
            sample_rate=sample_rate(plan, len(data)),
            steps=steps_total - sum(int(h[2]) for h in history),
            delta=plan.privacy.target_delta,
            epsilon=composed_epsilon(engine.accountant.history, delta=plan.privacy.target_delta,
                                     accountant=plan.privacy.accountant),
        )
    return TrainResult(state_dict=state, num_examples=len(data), train_loss=losses[-1] if losses else math.nan, seconds=seconds, privacy=report)
