"""``fedsilo bench utility``: what federation and DP cost or buy in Dice, on hard non-IID silos.

No Flower (like ``fedsilo bench robustness``): each silo is a function call that trains with the
toolkit's own :func:`pipelines.training.train_local` (Opacus DP-SGD where private), on the 2D silos of
:mod:`fedsilo.hard_silos` (sizes 16..256 training cases, each silo with its own scanner offset and scale,
contrast, noise, bias field, object size and unlabelled distractors), with a small MONAI UNet.

Arms, each without DP and with DP at every epsilon in ``epsilons`` (delta 1e-5):

- ``pooled``: one model trained on the union of the silos' training data (the centralised upper bound);
- ``local``: each silo alone;
- ``fedavg``: FedAvg (McMahan et al. 2017, arXiv:1602.05629), updates weighted by examples;
- ``fedprox``: FedAvg with FedProx's proximal term ``mu/2 ||w - w_global||^2`` in each silo's local loss
  (Li et al. 2020, arXiv:1812.06127; ``training.fedprox_mu`` of the plan);
- ``<robust rule>``: the robustness bench's best rule (trimmed mean, beta trimming one update at each end),
  from :mod:`coordinator.aggregation`;
- ``personalized``: FedAvg for ``rounds - 1`` rounds, then each silo fine-tunes the global model on its own
  data for ``local_epochs`` and keeps the result (Wang et al. 2019, "Federated Evaluation of On-device
  Personalization", arXiv:1910.10252). This is the silos' own last-round training of the ``fedavg`` arm, so it
  costs the same compute and, under DP, the same privacy: the noise multiplier of every arm is chosen for
  ``rounds x local_epochs`` epochs (as the silo agent does), and fine-tuning is the last ``local_epochs`` of
  them, so the budget split is ``(rounds - 1) / rounds`` of the steps for federation and ``1 / rounds`` for
  fine-tuning, composing to the same epsilon. A silo with fewer cases than the minibatch fine-tunes at the plan's
  learning rate times ``n_k / B`` (:func:`finetune_lr_scales`, the linear scaling rule; ``finetune_lr_scaling``);
  where that applies the arm is a FedAvg run of its own with the fedavg arm's seeds, differing only there.
- ``ditto``: Ditto (Li, Hu, Beirami, Smith, ICML 2021, "Ditto: Fair and Robust Federated Learning Through
  Personalization", arXiv:2012.04221, Algorithm 1): FedAvg trains a global model ``w`` while each silo keeps a
  personal model ``v_k`` (from the same initial weights), trained on its own data with the loss
  ``f_k(v) + lambda/2 ||v - w^t||^2``, ``w^t`` the global model the silo received that round; the silo keeps
  ``v_k``. Same compute: each round a silo trains the global model for ``local_epochs - ditto_epochs`` epochs and
  its personal model for ``ditto_epochs`` (``rounds x local_epochs`` epochs of its data in all, like every arm;
  the global model gets fewer epochs than the ``fedavg`` arm's). Same privacy: both trainings are DP-SGD on the
  silo's data with the noise multiplier planned for ``rounds x local_epochs`` epochs and one accountant history
  per silo, so Opacus' RDP accountant composes all of them to the target epsilon (``params.epsilon_spent_ditto``).
  The proximal gradient ``lambda (v - w^t)`` is added after Opacus has clipped and noised (like FedProx's,
  :func:`pipelines.training.add_proximal_term`): it depends on no record, so it costs no privacy.

Compressed arms (only when asked: ``--compression int8,topk``; each costs one more FedAvg run per setting):

- ``fedavg-int8``, ``fedavg-topk`` (and ``fedavg-float16``): FedAvg where each silo's delta goes through
  :func:`pipelines.compression.compress` and :func:`~pipelines.compression.decompress` before aggregation, as
  it would on the wire: int8 per-tensor affine quantization with stochastic rounding (Jacob et al. 2018,
  arXiv:1712.05877), top-k at ``topk_fraction`` (default 1%) of the model's entries with the error-feedback
  residual kept per silo across rounds in the arm's own state (Stich et al. 2018, arXiv:1809.07599). They train
  with the fedavg arm's seeds, so the only difference from ``fedavg`` is the compression (a paired comparison);
  under DP the compression comes after clipping and noise (post-processing, no extra privacy). Rows: per-silo
  and mean Dice (baseline ``fedavg <privacy>``) and ``goal/<arm> vs fedavg <privacy>``: Dice points lost to
  plain FedAvg at the same privacy (goal: at most 0.5 for int8, 1.0 for top-k).

Same preprocessing and budget for every arm: each image is z-scored on its own (the plan's
``data.transforms: [NormalizeIntensity]``, the standard fix for per-scanner intensity offset and scale in
multi-site MRI/CT; ``--preprocess`` changes it), train and test alike, at every arm. Every arm sees
``rounds x local_epochs`` epochs of each silo's data (pooled: of the union, so the same number of sample
gradients in total; local: each silo alone for the same epochs). Federated arms use the plan's server optimizer
(:mod:`coordinator.server_optimizer`; default plain FedAvg, ``--server-optimizer adam`` is FedAdam, Reddi et al.
2021, arXiv:2003.00295). DP: per silo, sample-level DP-SGD, the noise multiplier chosen by
:func:`pipelines.training.plan_noise_multiplier` so that the whole run spends the target epsilon, the
accountant's history carried across rounds (the epsilon reached is in ``params.epsilon_spent``). Pooled under DP
is one dataset at the same epsilon.

Each (seed, privacy setting) is one job; ``workers`` child processes (``python -c``, job and result as JSON)
run them at once, so the default run uses both cores of a 2-core machine.

Evaluation: each silo's own held-out cases (Dice, :func:`pipelines.metrics.evaluate`); rows per silo and the
mean over silos, averaged over ``seeds`` (seeds ``first_seed`` onwards: 0, 1, 2 by default; settings are tuned
on other seeds, ``--first-seed 10``, so that the reported ones are held out). ``threshold`` baselines: the single
global intensity threshold with the best mean Dice on the pooled training data (non-private), applied at every
silo, on raw intensities and on the z-scored images every arm sees.

Rows: ``<arm> <privacy>`` / ``dice <silo>`` and ``dice mean``, baseline ``pooled <privacy>``; personalization
gains (baseline ``fedavg <privacy>``); ``goal/...`` rows: the gap of each federated arm to pooled (goal: at
most 2 Dice points), how many silos' local-only model it beats (goal: all; and, FLamby's reading, Ogier du Terrail
et al. 2022, arXiv:2210.04620, how many local-only models its mean beats when each is scored on every silo's
held-out cases: the ``local-only model of <silo>, every silo's cases`` rows), the gap of eps=8 to non-private
(goal: at most 3 points), for fedavg, fedprox, the robust rule, personalization and ditto (whose per-silo
gains over fedavg are the ``ditto gain <privacy>`` rows); ``total`` ``wall_seconds``
and ``cpu_seconds`` (this process and its workers).

Where the DP cost comes from (``--dp-without-noise``, off by default): one more setting, ``DP-no-noise``, in which
every arm trains exactly as under DP (the DP batch, learning rate and per-sample clip, Opacus' Poisson sampling,
the same seeds as the DP settings) with a noise multiplier of 0, so not privately. The ``dp cost/<arm>`` rows
split each arm's loss to DP into the DP optimizer's (``no-DP`` against ``DP-no-noise``) and the noise's
(``DP-no-noise`` against each epsilon).
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedsilo.errors import ConfigError

BENCH = "utility"
ARMS = ("pooled", "local", "fedavg", "fedprox", "robust", "personalized", "ditto")
#: Per-image preprocessing the bench offers (names of pipelines.transforms.TRANSFORMS, no arguments) or "none".
PREPROCESS = ("NormalizeIntensity", "ScaleIntensity", "none")
#: Dice points (x 100) the goals allow.
GOAL_POOLED_POINTS = 2.0
GOAL_DP8_POINTS = 3.0
#: Update compression the bench can add as FedAvg arms (``--compression``), and the Dice points each may lose
#: against plain FedAvg at the same privacy (issue 9's goals; float16 has none).
COMPRESSIONS = ("float16", "int8", "topk")
GOAL_COMPRESSION_POINTS = {"int8": 0.5, "topk": 1.0}


def compression_spec(spec: str, topk_fraction: float) -> tuple[str, float]:
    """``"int8"`` -> ("int8", topk_fraction); ``"topk"`` -> ("topk", topk_fraction); ``"topk:0.1"`` -> ("topk", 0.1)
    (a top-k arm at its own fraction, so that one run compares several). ConfigError names a bad spec."""
    mode, _, fraction = spec.partition(":")
    if mode not in COMPRESSIONS or (fraction and mode != "topk"):
        raise ConfigError(f"--compression {spec!r} is not known",
                          fix=f"use some of: {', '.join(COMPRESSIONS)}, or topk:FRACTION (float32 is the fedavg arm)")
    if not fraction:
        return mode, topk_fraction
    try:
        value = float(fraction)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise ConfigError(f"--compression {spec!r}: the top-k fraction must be in (0, 1]", fix="e.g. topk:0.1")
    return mode, value


@dataclass(frozen=True)
class UtilityConfig:
    """Sizes and training settings (defaults: 3 seeds; measured 2026-11-27 with 2 workers on a shared 2-core
    machine: 689 CPU-seconds, 1090 s wall while the other core was busy with other work (458 s wall on a quieter
    machine), for the defaults below, no DP and eps 1, 3 and 8; with the ditto arm added, 711 CPU-seconds and
    970 s wall, the machine shared again).

    silos / train_sizes / test_cases / size: the data (:func:`fedsilo.hard_silos.hard_profiles`).
    rounds / local_epochs: training; every arm gets rounds x local_epochs epochs.
    batch_size / dp_batch_size: minibatch without / with DP, every arm alike. Without DP 8: FedAvg's local
    minibatch B sets its local steps per round, u = local_epochs * n_k / B (McMahan et al. 2017,
    arXiv:1602.05629, who add computation per client by lowering B). At the same sample gradients per arm a
    federated round moves the global model by the example-weighted mean of the silos' trajectories, a fraction
    of the sequential steps pooled training takes (seed 0, batch 32: FedAvg 3 x 4 .876, pooled after only 4
    of its 12 epochs .878); batch 8 gives FedAvg .894 against .860 at batch 32 (3 seeds; pooled .925 / .919,
    local-only .919 / .898). With DP 64: DP-SGD's noise per step is sigma * clip / B, and at eps=8 FedAvg
    loses 1.4 to 2.6 points at batch 8 against 32 (seed 0) and gains 1.7 at 64 (.844 against .827, 3 seeds;
    pooled .842 against .817), so the DP arms take 64.
    lr / dp_lr / momentum: SGD without / with DP (momentum: under DP it averages the noise out, and clipping
    shrinks the gradients, hence the larger DP rate; see ../shared/STACK.md). DP lr 2.5 with clip 0.1 (was 1.0
    with 0.5): nearly every per-sample gradient is clipped, so the step is set mostly by dp_lr x max_grad_norm
    (0.25, was 0.5); tuned jointly as Ponomareva et al. 2023 (arXiv:2303.00654) advise, at eps=8 on seeds
    10..13: FedAvg .863 against .855, personalized .890 against .877, every seed gained. At the product 0.25,
    clip 0.05 (lr 5) scored the same to 0.001, 0.25 (lr 1) within 0.4 points, 0.5 (lr 0.5) lower at seeds 10, 11;
    products 0.125 (seeds 10, 11), 0.5 and 1.0 (seed 10) scored lower, and dp batch 32 or 128 no better.
    channels / strides: the MONAI UNet (num_res_units 0). loss: the plan's loss.
    epsilons / delta / max_grad_norm: DP arms (max_grad_norm: DP-SGD's per-sample clip).
    fedprox_mu: FedProx's proximal weight.
    ditto_lambda / ditto_epochs: Ditto's proximal weight lambda (> 0; lambda 0 would be local-only training on a
    share of the budget, the ``local`` arm's job, and lambda x lr must stay below 2 (1 + momentum), where
    heavy-ball SGD on the proximal term diverges) and the epochs of each round a silo gives its personal model
    (1 .. local_epochs - 1; the rest train the global model). Chosen on seeds 10..13 (mean Dice no DP / eps=8;
    local-only .920 / .880, FedAvg .902 / .863): lambda 0.1 with 2 of 4 epochs .916 / .884; with 1 epoch
    .892 / .876, with 3 .908 / .856; lambda 0.01 .906 / .850, 0.03 .909 / .878, 0.3 .913 / .861, 1.0 .904 / .852
    (2 epochs each).
    robust_rule: rule from coordinator.aggregation (f = 1). seeds / first_seed: repetitions, seeds
    ``first_seed .. first_seed + seeds - 1`` (each draws new silos and initial weights). The defaults are reported
    on seeds 0..2 and were chosen, from the fourth session of 2026-11-27 on, on seeds 10..13 (``--first-seed 10``),
    so that the reported figures are not the ones they were tuned on (earlier choices were made on seed 0).
    threads: torch threads per training process. workers: processes training (seed, privacy setting) jobs at
    once (1: all in this process).
    preprocess: the plan's deterministic per-image transform for every arm ("NormalizeIntensity": z-score each
    image, the usual fix for per-scanner intensity offset and scale; "ScaleIntensity": min-max; "none").
    server_optimizer / server_lr: the plan's ``federation.server_optimizer`` and ``server_lr`` for every federated
    arm (sgd at 1.0: plain FedAvg).
    compression: extra arms ``fedavg-<spec>`` for each spec named: a mode of :data:`COMPRESSIONS`, or
    ``topk:FRACTION`` for a top-k arm at its own fraction (default none).
    topk_fraction: the share of the model's entries a ``topk`` arm sends each round (default 1%).
    finetune_lr_scaling: the personalized arm's fine-tuning learning rate at a silo with fewer cases than the
    minibatch is the plan's times ``n_k / B`` (:func:`finetune_lr_scales`; chosen on seeds 10..13, where it moved
    personalized Dice at eps=8 from .890 to .901 and at eps=3 from .853 to .889; without DP every default silo
    has at least B = 8 cases, so nothing changes there).
    dp_without_noise: add the privacy setting ``DP-no-noise``: every arm trains exactly as under DP (the DP batch,
    learning rate and per-sample clipping, Opacus' Poisson sampling) with a noise multiplier of 0, so not
    privately. It splits each arm's DP cost in two: the DP optimizer's (batch, clipping, learning rate: no-DP
    against DP-no-noise) and the noise's (DP-no-noise against eps=8); the ``dp cost/...`` rows.
    """

    silos: int = 5
    train_sizes: tuple[int, ...] | None = None
    test_cases: int = 40
    size: int = 32
    rounds: int = 3
    local_epochs: int = 4
    batch_size: int = 8
    dp_batch_size: int = 64
    lr: float = 0.2
    dp_lr: float = 2.5
    momentum: float = 0.9
    channels: tuple[int, ...] = (8, 16, 32)
    strides: tuple[int, ...] = (2, 2)
    loss: str = "dice_ce"
    epsilons: tuple[float, ...] = (1.0, 3.0, 8.0)
    delta: float = 1e-5
    max_grad_norm: float = 0.1
    fedprox_mu: float = 0.01
    ditto_lambda: float = 0.1
    ditto_epochs: int = 2
    robust_rule: str = "trimmed_mean"
    seeds: int = 3
    first_seed: int = 0
    threads: int = 1
    workers: int = 2
    preprocess: str = "NormalizeIntensity"
    server_optimizer: str = "sgd"
    server_lr: float = 1.0
    compression: tuple[str, ...] = ()
    topk_fraction: float = 0.01
    finetune_lr_scaling: bool = True
    dp_without_noise: bool = False


#: The ``eps`` of the ``DP-no-noise`` setting (``dp_without_noise``): DP-SGD's optimizer with no noise, no privacy.
NO_NOISE = math.inf
NO_NOISE_NAME = "DP-no-noise"


def _privacy_name(eps: float | None) -> str:
    if eps is None:
        return "no-DP"
    return NO_NOISE_NAME if eps == NO_NOISE else f"eps={eps:g}"


def _setting_eps(pname: str) -> float | None:
    """The inverse of :func:`_privacy_name`."""
    if pname == "no-DP":
        return None
    return NO_NOISE if pname == NO_NOISE_NAME else float(pname[4:])


def _plan(config: UtilityConfig, eps: float | None, *, fedprox_mu: float = 0.0):
    from pipelines.plan import parse_plan

    privacy: dict[str, Any] = {"enabled": eps is not None, "target_delta": config.delta, "max_grad_norm": config.max_grad_norm}
    if eps is not None:  # DP-no-noise: a valid plan; its trainers override the noise multiplier with 0
        privacy["target_epsilon"] = float(eps) if eps != NO_NOISE else max(config.epsilons, default=8.0)
    return parse_plan({
        "name": "bench-utility", "task": "seg2d",
        "model": {"network": "UNet", "args": {"channels": list(config.channels), "strides": list(config.strides),
                                             "num_res_units": 0}},
        "training": {"local_epochs": config.local_epochs,
                     "batch_size": config.batch_size if eps is None else config.dp_batch_size, "loss": config.loss,
                     "optimizer": {"name": "sgd", "lr": config.lr if eps is None else config.dp_lr,
                                   "momentum": config.momentum},
                     "fedprox_mu": fedprox_mu},
        "privacy": privacy,
        "data": {"transforms": [] if config.preprocess == "none" else [{"name": config.preprocess}]},
        "federation": {"rounds": config.rounds, "server_lr": config.server_lr,
                       "server_optimizer": {"name": config.server_optimizer}},
    })


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def _load(model, state: dict[str, np.ndarray]) -> None:
    import torch

    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})


class _Trainer:
    """Trains one silo's copy of the model; carries each dataset's accountant history (DP)."""

    def __init__(self, plan, seed: int, *, noiseless: bool = False) -> None:
        self.plan, self.seed, self.noiseless = plan, seed, noiseless
        self.history: dict[str, list] = {}
        self.noise: dict[str, float] = {}
        self.epsilon: dict[str, float] = {}

    def train(self, key: str, start: dict[str, np.ndarray], data, *, epochs: int, salt: int,
              anchor: dict[str, np.ndarray] | None = None, lam: float = 0.0,
              lr_scale: float = 1.0) -> dict[str, np.ndarray]:
        """Train from ``start`` on ``data``; with ``anchor``, the loss gains ``lam/2 ||v - anchor||^2`` (Ditto's
        personal objective: :func:`pipelines.training.add_proximal_term` anchored at ``anchor``); ``lr_scale``
        multiplies the plan's learning rate (it costs no privacy: the noise multiplier is the plan's). Under DP
        every call with the same ``key`` (dataset) goes on one accountant history; a ``noiseless`` trainer runs
        Opacus with a noise multiplier of 0 (clipping and Poisson sampling only: no privacy, epsilon infinite)."""
        from pipelines.networks import build_network
        from pipelines.training import plan_noise_multiplier, train_local

        model = build_network(self.plan)  # Opacus hooks a module once: a fresh copy per training
        _load(model, start)
        private = self.plan.privacy.enabled
        kwargs: dict[str, Any] = {}
        if private:
            if key not in self.noise:
                self.noise[key] = 0.0 if self.noiseless else plan_noise_multiplier(self.plan, len(data))
                self.history[key] = []
            kwargs = {"history": self.history[key], "noise_multiplier": self.noise[key]}
        seed = int(np.random.SeedSequence([self.seed, salt, len(data)]).generate_state(1)[0]) & 0x7FFFFFFF
        if anchor is not None:  # Ditto's personal objective: FedProx's term, anchored at the round's global model
            kwargs.update(fedprox_mu=lam, proximal_anchor=anchor)
        with warnings.catch_warnings():
            if self.noiseless:  # Opacus' RDP analysis warns that no order bounds an infinite epsilon
                warnings.simplefilter("ignore", UserWarning)
            result = train_local(model, data, self.plan, epochs=epochs, seed=seed, lr_scale=lr_scale, **kwargs)
        if result.privacy is not None:
            self.history[key].append(result.privacy.entry)
            self.epsilon[key] = result.privacy.epsilon
        return {k: v.detach().cpu().numpy().copy() for k, v in result.state_dict.items()}


def finetune_lr_scales(sizes: Sequence[int], batch_size: int) -> list[float]:
    """Each silo's fine-tuning learning rate, as a factor of the plan's: ``min(1, n_k / B)``, the rule the silo
    agent applies to a personalizing plan's last round (:func:`pipelines.training.finetune_lr_scale`, where the
    reasons and figures are)."""
    from pipelines.training import finetune_lr_scale

    return [finetune_lr_scale(n, batch_size) for n in sizes]


def _dice(model, state, test, plan) -> float:
    from pipelines.metrics import evaluate

    _load(model, state)
    return float(evaluate(model, test, plan)["dice"])


class _Codec:
    """What the wire does to each silo's delta in a compressed arm: compress at the silo, decompress at the
    coordinator (:mod:`pipelines.compression`). Top-k's error-feedback residual is kept per silo across rounds."""

    def __init__(self, mode: str, topk_fraction: float, seed: int) -> None:
        self.mode, self.topk_fraction = mode, topk_fraction
        self.rng = np.random.default_rng(seed)  # int8's stochastic rounding
        self.residuals: dict[int, dict[str, np.ndarray] | None] = {}

    def __call__(self, silo: int, delta: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from pipelines.compression import compress, decompress

        payload, self.residuals[silo] = compress(delta, self.mode, topk_fraction=self.topk_fraction,
                                                 residual=self.residuals.get(silo), rng=self.rng)
        return decompress(payload, delta, self.mode, topk_fraction=self.topk_fraction)


def _federate(rule, trainer: _Trainer, initial, trains, config: UtilityConfig, salt: int,
              keep_last_local: bool = False,
              codec: Callable[[int, dict[str, np.ndarray]], dict[str, np.ndarray]] | None = None,
              epochs: int | None = None, starts: list[dict[str, np.ndarray]] | None = None,
              last_round_lr_scales: Sequence[float] | None = None,
              ) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    """``config.rounds`` rounds: every silo trains from the global model, ``rule`` aggregates the deltas
    (weighted by examples), the plan's server optimizer (:mod:`coordinator.server_optimizer`: plain ``sgd`` at
    lr 1 is FedAvg; ``adam``/``yogi`` are FedAdam/FedYogi) moves the global model by the aggregate. Returns the
    global model and, when asked, the silos' models of the last round (trained from the global model of round
    ``rounds - 1``). ``codec(silo, delta)``, when given, is what the wire does to each silo's delta (a
    :class:`_Codec`). ``epochs``: local epochs per round (default ``local_epochs``); ``starts``, when given,
    receives the global model each round starts from (Ditto's anchors); ``last_round_lr_scales``, when given, scale
    each silo's learning rate in the last round (the personalized arm's fine-tuning: :func:`finetune_lr_scales`)."""
    from coordinator.server_optimizer import build_server_optimizer

    server = build_server_optimizer(config.server_optimizer, config.server_lr)
    state = {k: v.copy() for k, v in initial.items()}
    last: list[dict[str, np.ndarray]] = []
    for r in range(config.rounds):
        if starts is not None:
            starts.append(state)
        deltas, weights, local_models = [], [], []
        for i, data in enumerate(trains):
            scale = last_round_lr_scales[i] if last_round_lr_scales and r == config.rounds - 1 else 1.0
            local = trainer.train(f"silo{i}", state, data, epochs=epochs or config.local_epochs,
                                  salt=salt * 1000 + r * 100 + i, lr_scale=scale)
            local_models.append(local)
            delta = {k: local[k] - state[k] for k in state if np.issubdtype(state[k].dtype, np.floating)}
            deltas.append(codec(i, delta) if codec is not None else delta)
            weights.append(float(len(data)))
        agg = rule.aggregate(deltas, weights)
        state = server.step(state, {k: agg[k] if k in agg else np.zeros_like(v) for k, v in state.items()})
        if keep_last_local and r == config.rounds - 1:
            last = local_models
    return state, last


def _silo_data(config: UtilityConfig, seed: int, plan):
    """(profiles, raw training sets, preprocessed training sets, preprocessed test sets) of one seed.

    The plan's deterministic transforms (``data.transforms``: per-image z-scoring by default) run once on every
    silo's training and test cases, as a silo agent runs them after reading its data; every arm trains and is
    evaluated on the same preprocessed arrays."""
    from fedsilo.hard_silos import hard_profiles, silo_cases
    from pipelines.dataset import apply_transforms
    from pipelines.transforms import split_transforms

    profiles = hard_profiles(config.silos, seed=seed, train_sizes=config.train_sizes, n_test=config.test_cases)
    raw_trains = [silo_cases(p, split="train", size=config.size) for p in profiles]
    raw_tests = [silo_cases(p, split="test", size=config.size) for p in profiles]
    deterministic, _ = split_transforms(plan.data.transforms, segmentation=True)
    trains = [apply_transforms(t, deterministic, segmentation=True) for t in raw_trains]
    tests = [apply_transforms(t, deterministic, segmentation=True) for t in raw_tests]
    return profiles, raw_trains, raw_tests, trains, tests


def _threshold_job(config: UtilityConfig, seed: int) -> dict[str, Any]:
    """The threshold baselines of one seed: the best global threshold on the pooled training data, on raw
    intensities and on the plan's preprocessed (z-scored) images, applied at every silo."""
    from fedsilo.hard_silos import best_threshold, threshold_dice

    _, raw_trains, raw_tests, trains, tests = _silo_data(config, seed, _plan(config, None))
    out: dict[str, Any] = {}
    for name, tr, te in (("raw", raw_trains, raw_tests), ("preprocessed", trains, tests)):
        t = best_threshold(np.concatenate([x.images for x in tr]), np.concatenate([x.labels for x in tr]))
        out[name] = {"threshold": t, "dice": [float(np.mean(threshold_dice(s.images, s.labels, t))) for s in te]}
    return out


def _setting_job(config: UtilityConfig, seed: int, eps: float | None, *, progress: bool,
                 emit: Callable[[str], None]) -> dict[str, Any]:
    """Every arm at one (seed, privacy setting); returns plain data (it may come back from a child process)."""
    import torch

    from coordinator.aggregation import build_rule
    from fedsilo.robustness import rule_args
    from pipelines.dataset import CaseArrays
    from pipelines.networks import build_network

    torch.set_num_threads(config.threads)
    pname = _privacy_name(eps)
    plan = _plan(config, eps)
    _, _, _, trains, tests = _silo_data(config, seed, plan)
    pooled = CaseArrays(np.concatenate([t.images for t in trains]), np.concatenate([t.labels for t in trains]))
    epochs_total = config.rounds * config.local_epochs
    n = len(trains)
    rule = build_rule(config.robust_rule, rule_args(config.robust_rule, n, 1, 1.0))
    fedavg = build_rule("fedavg", {})
    model = build_network(plan, seed=seed)
    initial = _state(model)
    dice: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    out: dict[str, Any] = {"seed": seed, "privacy": pname, "dice": dice, "seconds": seconds}

    def record(arm: str, states: Sequence[dict[str, np.ndarray]], t0: float) -> None:
        scores = [_dice(model, s, test, plan) for s, test in zip(states, tests)]
        dice[arm] = scores
        seconds[arm] = round(time.perf_counter() - t0, 1)
        if progress:
            emit(f"utility: seed {seed} {arm} {pname}: mean Dice {statistics.fmean(scores):.3f} "
                 f"({' '.join(f'{x:.2f}' for x in scores)}) {seconds[arm]:.0f}s")

    accounted = eps is not None and eps != NO_NOISE  # a DP setting with an epsilon to report

    def new_trainer(plan_, seed_: int) -> _Trainer:
        return _Trainer(plan_, seed_, noiseless=eps == NO_NOISE)

    t0 = time.perf_counter()
    if eps is None:  # the floor: the initial weights every arm starts from
        record("untrained", [initial] * n, t0)
    trainer = new_trainer(plan, seed * 7919 + 1)
    record("pooled", [trainer.train("pooled", initial, pooled, epochs=epochs_total, salt=1)] * n, t0)

    t0 = time.perf_counter()
    trainer = new_trainer(plan, seed * 7919 + 2)
    local_states = [trainer.train(f"silo{i}", initial, d, epochs=epochs_total, salt=2 + i) for i, d in enumerate(trains)]
    record("local", local_states, t0)
    # Each local-only model on every silo's held-out cases (FLamby's "local" baselines, Ogier du Terrail et al. 2022).
    out["local_everywhere"] = [statistics.fmean(_dice(model, s, test, plan) for test in tests) for s in local_states]

    t0 = time.perf_counter()
    trainer = new_trainer(plan, seed * 7919 + 3)
    fed_state, last = _federate(fedavg, trainer, initial, trains, config, 3, keep_last_local=True)
    record("fedavg", [fed_state] * n, t0)
    if accounted:
        out["epsilon_spent"] = max(trainer.epsilon.values())
        out["noise"] = {k: round(v, 4) for k, v in trainer.noise.items()}
    scales = finetune_lr_scales([len(d) for d in trains], plan.training.batch_size) if config.finetune_lr_scaling else []
    if any(s != 1.0 for s in scales):  # a silo smaller than the batch fine-tunes at its own rate: a run of its own
        t0 = time.perf_counter()      # (the fedavg arm's seeds; only the last round's rates differ)
        trainer = new_trainer(plan, seed * 7919 + 3)
        last = _federate(fedavg, trainer, initial, trains, config, 3, keep_last_local=True,
                         last_round_lr_scales=scales)[1]
        if accounted:
            out["epsilon_spent_personalized"] = max(trainer.epsilon.values())
    record("personalized", last, t0)

    for spec in config.compression:  # the fedavg arm's seeds: only the compression differs
        t0 = time.perf_counter()
        trainer = new_trainer(plan, seed * 7919 + 3)
        codec = _Codec(*compression_spec(spec, config.topk_fraction), seed * 7919 + 4)
        record(f"fedavg-{spec}", [_federate(fedavg, trainer, initial, trains, config, 3, codec=codec)[0]] * n, t0)

    t0 = time.perf_counter()
    trainer = new_trainer(_plan(config, eps, fedprox_mu=config.fedprox_mu), seed * 7919 + 3)
    record("fedprox", [_federate(fedavg, trainer, initial, trains, config, 3)[0]] * n, t0)

    t0 = time.perf_counter()
    trainer = new_trainer(plan, seed * 7919 + 3)
    record(config.robust_rule, [_federate(rule, trainer, initial, trains, config, 3)[0]] * n, t0)

    t0 = time.perf_counter()
    trainer = new_trainer(plan, seed * 7919 + 5)
    record("ditto", _ditto(trainer, initial, trains, config, fedavg), t0)
    if accounted:
        out["epsilon_spent_ditto"] = max(trainer.epsilon.values())
    return out


def _ditto(trainer: _Trainer, initial, trains, config: UtilityConfig, fedavg) -> list[dict[str, np.ndarray]]:
    """Ditto (Algorithm 1 of Li et al. 2021, every silo every round): FedAvg with ``local_epochs - ditto_epochs``
    epochs a round; each silo's personal model trains ``ditto_epochs`` a round towards that round's global model
    ``w^t``. The personal models never reach the global one, so they train after the federation, each round's
    ``w^t`` in turn (the same updates as interleaved; the accountant's composition does not depend on order).
    Global and personal training share the silo's accountant history (key ``silo<i>``). Returns the personal
    models."""
    starts: list[dict[str, np.ndarray]] = []
    _federate(fedavg, trainer, initial, trains, config, 5, epochs=config.local_epochs - config.ditto_epochs,
              starts=starts)
    personal = []
    for i, data in enumerate(trains):
        v = initial
        for r, w in enumerate(starts):
            v = trainer.train(f"silo{i}", v, data, epochs=config.ditto_epochs, salt=6000 + r * 100 + i, anchor=w,
                              lam=config.ditto_lambda)
        personal.append(v)
    return personal


_RESULT_MARK = "UTILITY-RESULT "


def _child_main() -> None:
    """A worker process: one job as JSON on stdin, its result as one marked JSON line on stdout (no pickle)."""
    import json

    from fedsilo.errors import FedsiloError

    job = json.loads(sys.stdin.read())
    raw = job["config"]
    for key in ("train_sizes", "channels", "strides", "epsilons", "compression"):
        if raw.get(key) is not None:
            raw[key] = tuple(raw[key])
    config = UtilityConfig(**raw)
    try:
        result = _setting_job(config, job["seed"], job["eps"], progress=job["progress"],
                              emit=lambda line: print(line, file=sys.stderr, flush=True))
    except FedsiloError as exc:
        result = {"error": exc.message, "fix": exc.fix}
    print(_RESULT_MARK + json.dumps(result), flush=True)


def _run_jobs(config: UtilityConfig, jobs: list[tuple[int, float | None]], *, progress: bool,
              emit: Callable[[str], None]) -> list[dict[str, Any]]:
    """Run the (seed, epsilon) jobs: in this process when ``workers`` is 1, else in up to ``workers`` child
    processes at once (``python -c`` with the job as JSON; their progress lines go to this process's stderr)."""
    import json
    import subprocess

    if config.workers == 1 or len(jobs) == 1:
        return [_setting_job(config, seed, eps, progress=progress, emit=emit) for seed, eps in jobs]
    code = "from fedsilo.utility_bench import _child_main; _child_main()"
    pending = list(jobs)
    running: list[tuple[subprocess.Popen, tuple[int, float | None]]] = []
    results: dict[tuple[int, float | None], dict[str, Any]] = {}
    try:
        while pending or running:
            while pending and len(running) < config.workers:
                seed, eps = pending.pop(0)
                proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        text=True)
                assert proc.stdin is not None
                proc.stdin.write(json.dumps({"config": asdict(config), "seed": seed, "eps": eps, "progress": progress}))
                proc.stdin.close()
                running.append((proc, (seed, eps)))
            proc, key = running.pop(0)
            assert proc.stdout is not None
            out = proc.stdout.read()
            code_ = proc.wait()
            lines = [x for x in out.splitlines() if x.startswith(_RESULT_MARK)]
            if code_ != 0 or not lines:
                raise RuntimeError(f"utility bench worker for seed {key[0]} {_privacy_name(key[1])} failed "
                                   f"(exit code {code_}; its error is above)")
            result = json.loads(lines[-1][len(_RESULT_MARK):])
            if "error" in result:
                raise ConfigError(result["error"], fix=result["fix"])
            results[key] = result
    finally:
        for proc, _ in running:
            proc.kill()
            proc.wait()
    return [results[k] for k in jobs]


def _seeds(config: UtilityConfig) -> range:
    """The seeds a run uses: ``first_seed .. first_seed + seeds - 1``."""
    return range(config.first_seed, config.first_seed + config.seeds)


def run_utility_bench(*, config: UtilityConfig | None = None, progress: bool = False,
                      log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every arm at every privacy setting; returns ``{"bench": "utility", "params", "machine", "rows"}``."""
    from fedsilo.hard_silos import hard_profiles

    config = config or UtilityConfig()
    _check(config)
    emit = log or (lambda line: print(line, file=sys.stderr, flush=True))
    started = time.perf_counter()
    cpu_started = time.process_time()
    children_started = os.times()
    noiseless = [NO_NOISE] if config.dp_without_noise else []
    settings: list[float | None] = [None, *noiseless, *config.epsilons]
    # DP settings first: they take longest, so that the workers finish together.
    jobs = [(seed, eps) for eps in [*config.epsilons, *noiseless, None] for seed in _seeds(config)]
    outcomes = _run_jobs(config, jobs, progress=progress, emit=emit)
    # dice[(arm, privacy)][seed] = per-silo Dice list
    dice: dict[tuple[str, str], list[list[float]]] = {}
    spent: dict[str, float] = {}
    spent_ditto: dict[str, float] = {}
    spent_personalized: dict[str, float] = {}
    everywhere: dict[str, list[list[float]]] = {}  # privacy -> per seed, each local-only model's Dice on every silo
    noise: dict[str, dict[str, float]] = {}
    seconds: dict[str, dict[str, float]] = {}
    for out in sorted(outcomes, key=lambda o: (settings.index(_setting_eps(o["privacy"])), o["seed"])):
        for arm, scores in out["dice"].items():
            dice.setdefault((arm, out["privacy"]), []).append(scores)
        if "epsilon_spent" in out:
            spent[out["privacy"]] = max(spent.get(out["privacy"], 0.0), out["epsilon_spent"])
            noise.setdefault(out["privacy"], out["noise"])
        for key, spent_by in (("epsilon_spent_ditto", spent_ditto), ("epsilon_spent_personalized", spent_personalized)):
            if key in out:
                spent_by[out["privacy"]] = max(spent_by.get(out["privacy"], 0.0), out[key])
        seconds.setdefault(out["privacy"], out["seconds"])
        everywhere.setdefault(out["privacy"], []).append(out["local_everywhere"])
    thresholds = [_threshold_job(config, seed) for seed in _seeds(config)]
    wall = time.perf_counter() - started
    children = os.times()
    cpu = (time.process_time() - cpu_started) + (children.children_user - children_started.children_user) + (
        children.children_system - children_started.children_system)
    profiles = hard_profiles(config.silos, seed=0, train_sizes=config.train_sizes, n_test=config.test_cases)
    return _result(config, dice, thresholds, spent, noise, seconds, wall, cpu, [p.name for p in profiles],
                   [p.n_train for p in profiles], spent_ditto, spent_personalized, everywhere)


def _check(config: UtilityConfig) -> None:
    from coordinator.aggregation import RULES
    from coordinator.server_optimizer import OPTIMIZERS

    for name in ("silos", "rounds", "local_epochs", "batch_size", "dp_batch_size", "seeds", "threads", "test_cases",
                 "workers"):
        value = getattr(config, name)
        low = 2 if name in ("silos", "rounds") else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"--{name.replace('_', '-')} {value!r} is too small", fix=f"use {low} or more")
    if isinstance(config.first_seed, bool) or not isinstance(config.first_seed, int) or config.first_seed < 0:
        raise ConfigError(f"--first-seed {config.first_seed!r} must be 0 or more", fix="e.g. --first-seed 10")
    if any(not (0 < e <= 100) for e in config.epsilons):
        raise ConfigError(f"--epsilons {list(config.epsilons)}: each must be in (0, 100]", fix="e.g. --epsilons 1,3,8")
    if config.robust_rule not in RULES or config.robust_rule == "fedavg":
        robust = [r for r in RULES if r != "fedavg"]
        raise ConfigError(f"--robust-rule {config.robust_rule!r} is not a robust rule", fix=f"use one of: {', '.join(robust)}")
    if config.preprocess not in PREPROCESS:
        raise ConfigError(f"--preprocess {config.preprocess!r} is not offered", fix=f"use one of: {', '.join(PREPROCESS)}")
    if config.server_optimizer not in OPTIMIZERS:
        raise ConfigError(f"--server-optimizer {config.server_optimizer!r} is not known", fix=f"use one of: {', '.join(OPTIMIZERS)}")
    if not config.server_lr > 0:
        raise ConfigError(f"--server-lr {config.server_lr} must be positive", fix="e.g. --server-lr 1.0")
    if not config.max_grad_norm > 0:
        raise ConfigError(f"--max-grad-norm {config.max_grad_norm} must be positive", fix="e.g. --max-grad-norm 0.1")
    if config.fedprox_mu <= 0:
        raise ConfigError(f"--fedprox-mu {config.fedprox_mu} must be positive", fix="e.g. --fedprox-mu 0.01")
    _check_ditto(config)
    if isinstance(config.topk_fraction, bool) or not 0 < config.topk_fraction <= 1:
        raise ConfigError(f"--topk-fraction {config.topk_fraction} must be in (0, 1]", fix="e.g. --topk-fraction 0.01")
    for spec in config.compression:
        compression_spec(spec, config.topk_fraction)
    if len(set(config.compression)) != len(config.compression):
        raise ConfigError(f"--compression {','.join(config.compression)}: an arm twice", fix="name each arm once")


def _check_ditto(config: UtilityConfig) -> None:
    """Ditto's lambda: positive (0 is local-only training on a share of the budget: the ``local`` arm), finite,
    and lambda x lr below 2 (1 + momentum) at every learning rate in use (heavy-ball SGD on the quadratic
    ``lambda/2 ||v - w||^2`` diverges from there); its personal epochs: 1 .. local_epochs - 1."""
    lam = config.ditto_lambda
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 < lam < float("inf"):
        raise ConfigError(f"--ditto-lambda {lam!r} must be a positive number",
                          fix="e.g. --ditto-lambda 0.1 (lambda 0 is local-only training: the local arm)")
    lrs = [config.lr, *([config.dp_lr] if config.epsilons or config.dp_without_noise else [])]
    limit = 2 * (1 + config.momentum)
    if max(lrs) * lam >= limit:
        raise ConfigError(f"--ditto-lambda {lam:g} x lr {max(lrs):g} is {max(lrs) * lam:g}, at or above "
                          f"2 (1 + momentum) = {limit:g}: SGD on the proximal term diverges",
                          fix=f"use --ditto-lambda below {limit / max(lrs):g}")
    e = config.ditto_epochs
    if config.local_epochs < 2:
        raise ConfigError(f"--local-epochs {config.local_epochs} leaves the ditto arm no epoch to split between its global "
                          "and personal models", fix="use --local-epochs 2 or more")
    if isinstance(e, bool) or not isinstance(e, int) or not 1 <= e < config.local_epochs:
        raise ConfigError(f"--ditto-epochs {e!r} must be 1 .. local epochs - 1 ({config.local_epochs - 1})",
                          fix="give the personal model some of each round's local epochs and the global model the rest")


def _row(case: str, metric: str, value: float | None, baseline: str | None = None,
         base_value: float | None = None) -> dict[str, Any]:
    ratio = None
    if baseline is not None and value is not None and base_value:
        ratio = round(value / base_value, 4)
    if ratio is None:
        baseline = None  # DESIGN.md: a row without a ratio names no baseline
    return {"case": case, "metric": metric, "value": None if value is None else round(float(value), 4),
            "baseline": baseline, "ratio": ratio}


def _result(config, dice, thresholds, spent, noise, seconds, wall, cpu, names, sizes,
            spent_ditto=None, spent_personalized=None, everywhere=None) -> dict[str, Any]:
    import monai
    import opacus
    import torch

    def per_silo(key) -> list[float]:  # mean over seeds, per silo
        return [statistics.fmean(run[i] for run in dice[key]) for i in range(len(names))]

    def local_everywhere(pname: str) -> list[float]:  # each local-only model's mean Dice over every silo's cases
        runs = (everywhere or {}).get(pname, [])
        return [statistics.fmean(run[i] for run in runs) for i in range(len(names))] if runs else []

    rows: list[dict[str, Any]] = []
    for kind, case in (("raw", "threshold (global, raw intensities)"),
                       ("preprocessed", f"threshold (global, after {config.preprocess})")):
        if kind == "preprocessed" and config.preprocess == "none":
            continue
        thr = [statistics.fmean(t[kind]["dice"][i] for t in thresholds) for i in range(len(names))]
        for i, name in enumerate(names):
            rows.append(_row(case, f"dice {name}", thr[i]))
        rows.append(_row(case, "dice mean", statistics.fmean(thr)))
    untrained = per_silo(("untrained", _privacy_name(None)))
    rows.append(_row("untrained (initial weights)", "dice mean", statistics.fmean(untrained)))
    compressed = [f"fedavg-{m}" for m in config.compression]
    arms = ["pooled", "local", "fedavg", "fedprox", config.robust_rule, "personalized", "ditto", *compressed]
    privacy_names = [_privacy_name(None), *([NO_NOISE_NAME] if config.dp_without_noise else []),
                     *(_privacy_name(e) for e in config.epsilons)]
    means: dict[tuple[str, str], float] = {}
    for pname in privacy_names:
        base = per_silo(("pooled", pname))
        base_case = f"pooled {pname}"
        for arm in arms:
            values = per_silo((arm, pname))
            means[(arm, pname)] = statistics.fmean(values)
            case = f"{arm} {pname}"
            ref_case, ref = (base_case, base) if arm != "pooled" else (None, None)
            if arm in ("personalized", "ditto") or arm in compressed:
                ref_case, ref = f"fedavg {pname}", per_silo(("fedavg", pname))
            for i, name in enumerate(names):
                rows.append(_row(case, f"dice {name}", values[i], ref_case, ref[i] if ref else None))
            rows.append(_row(case, "dice mean", means[(arm, pname)], ref_case, statistics.fmean(ref) if ref else None))
        for i, value in enumerate(local_everywhere(pname)):
            rows.append(_row(f"local-only model of {names[i]}, every silo's cases {pname}", "dice mean", value))
        fed = per_silo(("fedavg", pname))
        for case, arm in (("personalization gain", "personalized"), ("ditto gain", "ditto")):
            pers = per_silo((arm, pname))
            for i, name in enumerate(names):
                rows.append(_row(f"{case} {pname}", f"dice points {name}", (pers[i] - fed[i]) * 100))

    goals: dict[str, Any] = {}
    nodp = _privacy_name(None)
    local = per_silo(("local", nodp))
    local_all = local_everywhere(nodp)
    for arm in ("fedavg", "fedprox", config.robust_rule, "personalized", "ditto"):
        gap = (means[("pooled", nodp)] - means[(arm, nodp)]) * 100
        fed = per_silo((arm, nodp))
        beats = sum(f > lo for f, lo in zip(fed, local))
        beats_everywhere = sum(means[(arm, nodp)] > lo for lo in local_all)
        rows.append(_row(f"goal/{arm} vs pooled {nodp}", "dice points behind", gap))
        rows.append(_row(f"goal/{arm} beats local-only {nodp}", "silos (of %d)" % len(names), float(beats)))
        rows.append(_row(f"goal/{arm} beats local-only on every silo's cases {nodp}", "local models (of %d)" % len(names),
                         float(beats_everywhere)))
        g = {"points_behind_pooled": round(gap, 2), "within_2_points": gap <= GOAL_POOLED_POINTS,
             "silos_beating_their_local_model": beats,
             "local_models_beaten_on_every_silos_cases": beats_everywhere}
        if 8.0 in config.epsilons:
            gap8 = (means[(arm, nodp)] - means[(arm, _privacy_name(8.0))]) * 100
            rows.append(_row(f"goal/{arm} eps=8 vs {nodp}", "dice points behind", gap8))
            g.update(eps8_points_behind_nodp=round(gap8, 2), eps8_within_3_points=gap8 <= GOAL_DP8_POINTS)
        if config.dp_without_noise:  # the DP cost in two: the DP optimizer's (batch, clip, lr), then the noise's
            optimizer_cost = (means[(arm, nodp)] - means[(arm, NO_NOISE_NAME)]) * 100
            rows.append(_row(f"dp cost/{arm} DP batch, clip and lr ({NO_NOISE_NAME}) vs {nodp}", "dice points behind",
                             optimizer_cost))
            g["dp_optimizer_points_behind_nodp"] = round(optimizer_cost, 2)
            for e in config.epsilons:
                noise_cost = (means[(arm, NO_NOISE_NAME)] - means[(arm, _privacy_name(e))]) * 100
                rows.append(_row(f"dp cost/{arm} noise {_privacy_name(e)} vs {NO_NOISE_NAME}", "dice points behind",
                                 noise_cost))
                g.setdefault("dp_noise_points_behind_no_noise", {})[_privacy_name(e)] = round(noise_cost, 2)
        goals[arm] = g
    for spec in config.compression:
        arm = f"fedavg-{spec}"
        mode, fraction = compression_spec(spec, config.topk_fraction)
        lost = {p: (means[("fedavg", p)] - means[(arm, p)]) * 100 for p in privacy_names}
        for p, points in lost.items():
            rows.append(_row(f"goal/{arm} vs fedavg {p}", "dice points lost", points))
        g: dict[str, Any] = {"points_lost_vs_fedavg": {p: round(v, 2) for p, v in lost.items()}}
        if mode == "topk":
            g["topk_fraction"] = fraction
        if mode in GOAL_COMPRESSION_POINTS:
            g.update(goal_points=GOAL_COMPRESSION_POINTS[mode],
                     within_goal=all(v <= GOAL_COMPRESSION_POINTS[mode] for v in lost.values()))
        goals[arm] = g
    rows.append(_row("total", "wall_seconds", wall))
    rows.append(_row("total", "cpu_seconds", cpu))

    profiles_text = {}
    from fedsilo.hard_silos import hard_profiles

    for p in hard_profiles(config.silos, seed=0, train_sizes=config.train_sizes, n_test=config.test_cases):
        d = asdict(p)
        d.pop("seed")
        d.pop("name")
        profiles_text[p.name] = d
    params = {
        "silos": len(names), "train_sizes": sizes, "test_cases_per_silo": config.test_cases, "seeds": config.seeds,
        "seed_values": list(_seeds(config)),
        "task": f"seg2d {config.size}x{config.size} synthetic (fedsilo.hard_silos), per-silo held-out Dice",
        "network": f"UNet channels={list(config.channels)} strides={list(config.strides)} num_res_units=0",
        "training": f"{config.rounds} rounds x {config.local_epochs} local epochs, "
                    f"batch {config.batch_size} (DP: {config.dp_batch_size}), "
                    f"SGD lr {config.lr} (DP: {config.dp_lr}) momentum {config.momentum}, loss {config.loss}",
        "preprocess": f"{config.preprocess} per image, every arm (train and test)",
        "server_optimizer": f"{config.server_optimizer} lr {config.server_lr} (every federated arm)",
        "arm_seconds": seconds, "workers": config.workers,
        "budget": f"every arm {config.rounds * config.local_epochs} epochs of each silo's data (pooled: of the union)",
        "epsilons": list(config.epsilons), "delta": config.delta, "max_grad_norm": config.max_grad_norm,
        "epsilon_spent": {k: round(v, 3) for k, v in spent.items()},
        "epsilon_spent_ditto": {k: round(v, 3) for k, v in (spent_ditto or {}).items()},
        "noise_multipliers_fedavg": noise,
        "fedprox_mu": config.fedprox_mu, "robust_rule": config.robust_rule, "robust_rule_f": 1,
        "personalization": "FedAvg for rounds-1 rounds, then local_epochs of local fine-tuning at each silo: the same "
                           "compute and privacy budget as fedavg ((rounds-1)/rounds of the steps federated, 1/rounds fine-tuning)"
                           + (", fine-tuning at lr x min(1, n_k / batch) (linear scaling rule)" if config.finetune_lr_scaling else ""),
        "finetune_lr_scales": {_privacy_name(e): [round(x, 4) for x in finetune_lr_scales(
            sizes, config.batch_size if e is None else config.dp_batch_size)] if config.finetune_lr_scaling else
            [1.0] * len(sizes) for e in (None, *([NO_NOISE] if config.dp_without_noise else []), *config.epsilons)},
        "epsilon_spent_personalized": {k: round(v, 3) for k, v in (spent_personalized or {}).items()},
        "dp_without_noise": ("every arm trained as under DP (DP batch, lr, per-sample clipping, Poisson sampling) "
                             "with noise multiplier 0: not private; splits the DP cost into the optimizer's and the "
                             "noise's (dp cost/... rows)") if config.dp_without_noise else None,
        "ditto": {"lambda": config.ditto_lambda, "personal_epochs_per_round": config.ditto_epochs,
                  "global_epochs_per_round": config.local_epochs - config.ditto_epochs,
                  "how": "Ditto (Li et al. 2021, arXiv:2012.04221): FedAvg of the global model alongside a personal "
                         "model per silo trained with lambda/2 ||v - w^t||^2; each round's local epochs split between "
                         "the two; under DP one accountant history per silo over both (same epsilon)"},
        "threshold": {"raw_per_seed": [round(t["raw"]["threshold"], 4) for t in thresholds],
                      "preprocessed_per_seed": [round(t["preprocessed"]["threshold"], 4) for t in thresholds],
                      "chosen": "global, best mean Dice on the pooled training data (non-private)"},
        "profiles": profiles_text,
        "compression": {"arms": compressed, "topk_fraction": config.topk_fraction,
                        "how": "FedAvg with each silo's delta compressed and decompressed (pipelines.compression) "
                               "before aggregation; the fedavg arm's seeds; top-k residual kept per silo across rounds"},
        "goals": goals,
    }
    machine = {"cpus": os.cpu_count(), "torch": torch.__version__, "monai": monai.__version__, "opacus": opacus.__version__,
               "torch_threads": config.threads, "workers": config.workers, "python": platform.python_version()}
    return {"bench": BENCH, "params": params, "machine": machine, "rows": rows}


# --------------------------------------------------------------------------------------------- CLI


def add_bench_command(bsub) -> None:
    """``fedsilo bench utility`` (registered by fedsilo.bench_cli.BENCH_MODULES)."""
    d = UtilityConfig()
    p = bsub.add_parser("utility", help="Dice of pooled, local-only, FedAvg, FedProx, robust, personalized and Ditto "
                                        "(and, with --compression, FedAvg with int8/top-k updates) "
                                        "training on hard non-IID silos, without DP and at several epsilons")
    p.add_argument("--silos", type=int, default=d.silos, help=f"silos (default {d.silos})")
    p.add_argument("--train-sizes", default=None, help="comma-separated training cases per silo (default 16,32,64,128,256)")
    p.add_argument("--test-cases", type=int, default=d.test_cases, help=f"held-out cases per silo (default {d.test_cases})")
    p.add_argument("--size", type=int, default=d.size, help=f"image edge in pixels (default {d.size})")
    p.add_argument("--rounds", type=int, default=d.rounds, help=f"federated rounds (default {d.rounds})")
    p.add_argument("--local-epochs", type=int, default=d.local_epochs, help=f"local epochs per round (default {d.local_epochs})")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help=f"minibatch without DP, every arm (default {d.batch_size})")
    p.add_argument("--dp-batch-size", type=int, default=d.dp_batch_size,
                   help=f"minibatch with DP, every arm (default {d.dp_batch_size})")
    p.add_argument("--lr", type=float, default=d.lr, help=f"SGD learning rate without DP (default {d.lr})")
    p.add_argument("--dp-lr", type=float, default=d.dp_lr, help=f"SGD learning rate with DP (default {d.dp_lr})")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm,
                   help=f"DP-SGD per-sample clipping norm (default {d.max_grad_norm})")
    p.add_argument("--epsilons", default=",".join(f"{e:g}" for e in d.epsilons), help="DP settings (default 1,3,8)")
    p.add_argument("--fedprox-mu", type=float, default=d.fedprox_mu)
    p.add_argument("--ditto-lambda", type=float, default=d.ditto_lambda,
                   help=f"Ditto's proximal weight lambda, > 0 (default {d.ditto_lambda})")
    p.add_argument("--ditto-epochs", type=int, default=d.ditto_epochs,
                   help=f"of each round's local epochs, those Ditto gives each silo's personal model; the rest train "
                        f"the global model (default {d.ditto_epochs})")
    p.add_argument("--robust-rule", default=d.robust_rule)
    p.add_argument("--seeds", type=int, default=d.seeds, help=f"repetitions (default {d.seeds})")
    p.add_argument("--first-seed", type=int, default=d.first_seed,
                   help=f"first seed: the run uses seeds first-seed .. first-seed + seeds - 1 (default {d.first_seed}; "
                        "the defaults are chosen on seeds 10..13 and reported on 0..2)")
    p.add_argument("--threads", type=int, default=d.threads, help=f"torch threads per process (default {d.threads})")
    p.add_argument("--workers", type=int, default=d.workers,
                   help=f"processes training privacy settings at once (default {d.workers}; 1: all in this process)")
    p.add_argument("--preprocess", default=d.preprocess,
                   help=f"per-image transform for every arm: {', '.join(PREPROCESS)} (default {d.preprocess})")
    p.add_argument("--server-optimizer", default=d.server_optimizer,
                   help=f"server optimizer of the federated arms: sgd, adam, yogi (default {d.server_optimizer})")
    p.add_argument("--server-lr", type=float, default=d.server_lr, help=f"server learning rate (default {d.server_lr})")
    p.add_argument("--compression", default=None,
                   help=f"add FedAvg arms with compressed updates, comma-separated from {', '.join(COMPRESSIONS)}, or "
                        "topk:FRACTION (default none; each adds one FedAvg run per setting)")
    p.add_argument("--topk-fraction", type=float, default=d.topk_fraction,
                   help=f"share of entries the top-k arm sends (default {d.topk_fraction})")
    p.add_argument("--no-finetune-lr-scaling", dest="finetune_lr_scaling", action="store_false",
                   help="fine-tune the personalized arm at the plan's learning rate at every silo (default: a silo "
                        "with fewer cases than the minibatch fine-tunes at lr x cases / minibatch)")
    p.add_argument("--dp-without-noise", action="store_true",
                   help=f"add the setting {NO_NOISE_NAME}: every arm trained as under DP (DP batch, lr, per-sample "
                        "clipping) with no noise, not private, to split the DP cost into the optimizer's and the "
                        "noise's (one more job per seed)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=_utility)


def _numbers(text: str | None, what: str, kind: type) -> tuple | None:
    if text is None:
        return None
    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            out.append(kind(part))
        except ValueError:
            raise ConfigError(f"--{what}: '{part}' is not a number", fix=f"give comma-separated numbers, e.g. --{what} 1,3,8") from None
    return tuple(out)


def _modes(text: str | None) -> list[str]:
    if text is None:
        return []
    modes = [t.strip() for t in text.split(",") if t.strip()]
    if not modes:
        raise ConfigError("--compression: no arm given", fix=f"name some of: {', '.join(COMPRESSIONS)}, topk:FRACTION")
    return modes


def _utility(args) -> int:
    from fedsilo.bench_report import print_result

    sizes = _numbers(args.train_sizes, "train-sizes", int)
    config = UtilityConfig(
        silos=len(sizes) if sizes else args.silos, train_sizes=sizes, test_cases=args.test_cases, size=args.size,
        rounds=args.rounds, local_epochs=args.local_epochs, batch_size=args.batch_size,
        dp_batch_size=args.dp_batch_size, lr=args.lr, dp_lr=args.dp_lr,
        max_grad_norm=args.max_grad_norm,
        epsilons=_numbers(args.epsilons, "epsilons", float) or (), fedprox_mu=args.fedprox_mu,
        ditto_lambda=args.ditto_lambda, ditto_epochs=args.ditto_epochs,
        robust_rule=args.robust_rule, seeds=args.seeds, first_seed=args.first_seed, threads=args.threads,
        workers=args.workers,
        preprocess=args.preprocess, server_optimizer=args.server_optimizer, server_lr=args.server_lr,
        compression=tuple(_modes(args.compression)), topk_fraction=args.topk_fraction,
        finetune_lr_scaling=args.finetune_lr_scaling, dp_without_noise=args.dp_without_noise,
    )
    if config.size < 16:
        raise ConfigError(f"--size {config.size} is too small", fix="use 16 or more")
    result = run_utility_bench(config=config, progress=True)  # progress goes to stderr, --json to stdout
    print_result(result, as_json=args.json)
    return 0


__all__ = ["ARMS", "COMPRESSIONS", "UtilityConfig", "add_bench_command", "compression_spec", "finetune_lr_scales",
           "run_utility_bench"]
