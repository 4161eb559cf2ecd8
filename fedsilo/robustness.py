"""``fedsilo bench robustness``: aggregation rules under attack, in one process.

A benchmark of aggregation under attack, not of the transport: each silo is a function call (no Flower
processes), each round is: every silo trains one local epoch from the global model with the toolkit's own
pipeline (:func:`pipelines.training.train_local`, no DP by default: DP noise would mix a second effect
into the figures), the malicious silos replace their reply (:mod:`fedsilo.attacks`), the coordinator's
rule (:func:`coordinator.aggregation.build_rule`) aggregates all replies weighted by num-examples, and
the global model moves ``x += server_lr * aggregate``. As the coordinator's validation would, an update
with a non-finite value is dropped; a round whose aggregate is not finite leaves the model unchanged.

Task: 2D binary segmentation of small synthetic images (:func:`monai.data.synthetic.create_test_image_2d`,
in memory: reading DICOM is not what this measures), one non-IID profile per silo from
:func:`pipelines.synthetic.default_profiles` (intensity scale, noise, number and size of discs), a tiny
MONAI UNet (allow-listed, built by :func:`pipelines.networks.build_network`). The final Dice
(:func:`pipelines.metrics.evaluate`) is measured on a held-out clean test set pooled from every silo's
profile.

Grid: every attack (plus ``none``, the clean baseline: the would-be attackers behave honestly) times every
rule registered in :data:`coordinator.aggregation.RULES` (arguments chosen from f, the number of malicious
silos: see :func:`rule_args`), over ``seeds`` seeds. Everything is seeded per (seed, silo, round): all
cells of a seed share the data, the initial model, which silos are malicious and the first round's honest
updates (computed once), so cells differ only by attack and rule.

Rows (DESIGN.md benchmark format): per cell ``<rule>/<attack>`` ``dice_mean`` and ``dice_worst`` (mean and
minimum over seeds; baseline ``fedavg/none``), ``success_rate`` of the backdoor for ``<rule>/backdoor``
(baseline ``<rule>/none``: how often the same trigger "works" on a model trained without attack) and
``<rule>/none``; per rule ``<rule>/all-attacks`` ``dice_worst`` (minimum over every attack, ``none``
included, and seed); ``summary/best-robust`` (the best such value among rules other than fedavg, the rule
named in ``params.summary``), ``summary/gap-to-clean-fedavg`` (Dice points by which it trails fedavg/none's
dice_worst), ``summary/goal-met`` (1 when the gap is at most 2 points and plain FedAvg visibly breaks, i.e.
loses at least 10 Dice points of dice_mean, under at least one attack) and ``total`` ``wall_seconds``.
A ratio is null where its baseline's value is 0 (a backdoor that never fires without the attack).

Backdoor success rate: the fraction of the pooled clean test images, with the trigger stamped
(:func:`fedsilo.attacks.stamp_trigger`), on which the final model predicts foreground on at least 75% of
the trigger square's pixels (the attacker's target), averaged over seeds.
"""

from __future__ import annotations

import math
import os
import platform
import statistics
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedsilo.attacks import ATTACKS, Attack, RoundInfo, build_attack, stamp_trigger, trigger_region
from fedsilo.errors import ConfigError

Delta = dict[str, np.ndarray]

BASELINE = "fedavg/none"
#: Dice points (x 100) a robust rule may trail clean FedAvg by, and that FedAvg must lose to count as broken.
GOAL_GAP_POINTS = 2.0
BREAK_POINTS = 10.0
#: Fraction of the trigger square predicted foreground for a triggered image to count as backdoored.
BACKDOOR_HIT = 0.75


@dataclass(frozen=True)
class BenchConfig:
    """The federation's size and training settings (defaults: the short setting). Measured on a shared
    2-core machine, 1 torch thread: about 2.6 s per federation (6 rounds of 10 silos; backdoor cells about
    twice that, the attackers train 6 epochs), so the full default grid, 10 silos x 8 attack settings
    x 9 rules x 3 seeds = 216 federations, took 10.5 minutes (8.2 CPU-minutes).

    size: image edge in pixels. train_cases / test_cases: per silo (the test set pools every silo's).
    rounds: federated rounds. local_epochs, batch_size, optimizer, lr: each silo's training (Adam: this
    is non-private training, where Adam converges fastest in few rounds). channels / strides: the MONAI
    UNet (``num_res_units`` 0). server_lr: the server step. threads: torch intra-op threads (tiny
    convolutions gain nothing from more on 2 cores). dp: train with DP-SGD (the plan's defaults,
    epsilon 8 over the run) instead of plain training.
    """

    size: int = 32
    train_cases: int = 32
    test_cases: int = 6
    rounds: int = 6
    local_epochs: int = 1
    batch_size: int = 8
    optimizer: str = "adam"
    lr: float = 0.01
    channels: tuple[int, ...] = (8, 16, 32)
    strides: tuple[int, ...] = (2, 2)
    server_lr: float = 1.0
    threads: int = 1
    dp: bool = False


# --------------------------------------------------------------------------------------------- rule arguments


def rule_args(name: str, n: int, f: int, ref_norm: float) -> dict[str, Any]:
    """Arguments for rule ``name`` with ``n`` updates of which ``f`` are malicious.

    f-parameterised rules get f (multikrum averages m = n - f); trimmed_mean trims beta = (f + 0.5) / n from
    each end (so that int(beta * n) = f); the norm-based rules (centered_clipping's tau,
    norm_bounded_mean's max_norm) get ``ref_norm``, the median L2 norm of the honest first-round updates
    of the same seed (the calibration a plan author would make from a clean round). Other rules: none.
    """
    if name in ("krum", "bulyan"):
        return {"f": f}
    if name == "multikrum":
        return {"f": f, "m": max(n - f, 1)}
    if name == "trimmed_mean":
        return {"beta": min((f + 0.5) / n, 0.49)}
    if name == "centered_clipping":
        return {"tau": float(ref_norm), "iters": 1}
    if name == "norm_bounded_mean":
        return {"max_norm": float(ref_norm)}
    return {}


def _build_rule(name: str, n: int, f: int, ref_norm: float):
    """(rule, args) for ``name``; an f-parameterised rule that cannot take n updates with f (Bulyan needs
    n >= 4f + 3) is built with the largest f it accepts. ConfigError when none works."""
    from coordinator.aggregation import build_rule

    last: Exception | None = None
    for f_used in range(f, -1, -1):
        args = rule_args(name, n, f_used, ref_norm)
        try:
            rule = build_rule(name, args)
        except ConfigError as exc:
            last = exc
            if "f" not in args and "beta" not in args:
                break
            continue
        need = getattr(rule, "min_updates", lambda: 1)()
        if need <= n:
            return rule, args
        last = ConfigError(f"{name} needs {need} updates, the federation has {n}")
        if "f" not in args and "beta" not in args:
            break
    raise ConfigError(f"rule {name!r} cannot run with {n} silos: {last}", fix="use more silos or fewer malicious ones")


# --------------------------------------------------------------------------------------------- one seed's world


def _seq(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


def _tag(text: str) -> int:
    return zlib.crc32(text.encode())


def _radii(radius_max: int, size: int) -> tuple[int, int]:
    rad_max = max(min(int(round(radius_max * size / 32)), (size - 1) // 2), 2)
    return rad_max, max(1, rad_max // 2)


def _cases(profile, start: int, count: int, size: int):
    """``count`` cases of ``profile`` (indices from ``start``): images scaled by the profile's intensity
    (scanner differences are kept: no per-image normalisation), float32 masks."""
    from monai.data.synthetic import create_test_image_2d

    from pipelines.dataset import CaseArrays

    rad_max, rad_min = _radii(profile.radius_max, size)
    images, masks = [], []
    for i in range(start, start + count):
        rs = np.random.RandomState([profile.seed & 0xFFFFFFFF, i, 0xB3])
        image, mask = create_test_image_2d(size, size, num_objs=profile.num_objects, rad_max=rad_max, rad_min=rad_min,
                                           noise_max=profile.noise, num_seg_classes=1, random_state=rs)
        images.append(image * profile.intensity_scale)
        masks.append(mask > 0)
    return CaseArrays(np.stack(images)[:, None].astype(np.float32), np.stack(masks)[:, None].astype(np.float32))


def _to_numpy(state) -> Delta:
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


def _finite(delta: Delta) -> bool:
    return all(np.all(np.isfinite(v)) for v in delta.values() if np.issubdtype(v.dtype, np.floating))


def _norm(delta: Delta) -> float:
    return math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values()
                         if np.issubdtype(v.dtype, np.floating)))


class _World:
    """One seed: data, test sets, initial model, malicious silos, the honest first-round updates."""

    def __init__(self, seed: int, silos: int, malicious: int, config: BenchConfig, plan, model) -> None:
        from pipelines.dataset import CaseArrays
        from pipelines.synthetic import default_profiles

        self.seed, self.silos, self.config, self.plan, self.model = seed, silos, config, plan, model
        profiles = default_profiles(silos, seed=seed)
        self.train = [_cases(p, 0, config.train_cases, config.size) for p in profiles]
        tests = [_cases(p, 100_000, config.test_cases, config.size) for p in profiles]
        self.test = CaseArrays(np.concatenate([t.images for t in tests]), np.concatenate([t.labels for t in tests]))
        self.triggered = stamp_trigger(self.test.images)
        rng = np.random.default_rng(_seq(seed, 0xA77))
        self.malicious = sorted(int(i) for i in rng.choice(silos, size=malicious, replace=False))
        from pipelines.networks import build_network

        self.initial = _to_numpy(build_network(plan, seed=_seq(seed, 0x1417) & 0x7FFFFFFF).state_dict())
        self._first: dict[int, Delta] = {}
        self.ref_norm = statistics.median(_norm(self.honest_delta(self.initial, 0, i)) for i in range(silos))

    def honest_delta(self, global_state: Delta, round_: int, silo: int, data=None, epochs: int | None = None) -> Delta:
        """Train ``silo`` one round from ``global_state``; round 0 of honest training is cached."""
        cacheable = round_ == 0 and data is None and epochs is None
        if cacheable and silo in self._first:
            return self._first[silo]
        delta = _train(self.model, global_state, self.train[silo] if data is None else data, self.plan,
                       seed=_seq(self.seed, round_, silo, 0x7EA), epochs=epochs)
        if cacheable:
            for v in delta.values():  # shared by every cell of the seed: an in-place change would raise
                v.setflags(write=False)
            self._first[silo] = delta
        return delta


def _train(model, global_state: Delta, data, plan, *, seed: int, epochs: int | None) -> Delta:
    import torch

    from pipelines.training import train_local

    if plan.privacy.enabled:  # Opacus hooks a module once: DP training gets a fresh copy each time
        from pipelines.networks import build_network

        model = build_network(plan)
    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in global_state.items()})
    result = train_local(model, data, plan, private=plan.privacy.enabled, seed=seed & 0x7FFFFFFF, epochs=epochs)
    local = _to_numpy(result.state_dict)
    return {k: (local[k] - global_state[k]) if np.issubdtype(global_state[k].dtype, np.floating) else local[k]
            for k in global_state}


def _load(model, state: Delta) -> None:
    import torch

    model.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in state.items()})


def backdoor_success(model, triggered: np.ndarray, size: int | None = None) -> float:
    """Fraction of ``triggered`` images (N, 1, H, W) on which ``model`` predicts foreground on at least
    :data:`BACKDOOR_HIT` of the trigger square's pixels."""
    import torch

    model.eval()
    region = trigger_region(triggered.shape[2:], size)
    hits = 0
    with torch.no_grad():
        for start in range(0, len(triggered), 32):
            logits = model(torch.from_numpy(triggered[start:start + 32]))
            pred = (torch.sigmoid(logits) > 0.5).numpy()
            cover = pred[(slice(None), slice(None), *region)].reshape(pred.shape[0], -1).mean(axis=1)
            hits += int(np.sum(cover >= BACKDOOR_HIT))
    return hits / max(len(triggered), 1)


@dataclass
class _Run:
    dice: float
    success: float
    seconds: float
    skipped_rounds: int
    dropped_updates: int
    args: dict[str, Any] = field(default_factory=dict)


def _run(world: _World, rule_name: str, attack: Attack, f: int) -> _Run:
    """One federation: ``rule_name`` aggregating, ``attack`` at the world's malicious silos."""
    from pipelines.metrics import evaluate

    start = time.perf_counter()
    config, n = world.config, world.silos
    rule, args = _build_rule(rule_name, n, f, world.ref_norm)
    need = getattr(rule, "min_updates", lambda: 1)()
    poisoned = {}
    if attack.kind == "data":
        from pipelines.dataset import CaseArrays

        for i in world.malicious:
            rng = np.random.default_rng(_seq(world.seed, i, _tag(attack.name)))
            images, labels = attack.poison_data(world.train[i].images, world.train[i].labels, rng)
            poisoned[i] = CaseArrays(images, labels)
    state = {k: v.copy() for k, v in world.initial.items()}
    skipped = dropped = 0
    for r in range(config.rounds):
        deltas: dict[int, Delta] = {}
        for i in range(n):
            if i not in world.malicious or attack.kind == "none":
                deltas[i] = world.honest_delta(state, r, i)
        honest = [deltas[i] for i in sorted(deltas)]
        if attack.kind != "none":
            for i in world.malicious:
                if attack.kind == "data":
                    own = world.honest_delta(state, r, i, data=poisoned[i], epochs=attack.local_epochs)
                elif attack.uses_own_update:
                    own = world.honest_delta(state, r, i)
                else:
                    own = {k: np.zeros_like(v) for k, v in state.items()}
                info = RoundInfo(n_silos=n, n_malicious=len(world.malicious), server_lr=config.server_lr, honest=honest,
                                 rng=np.random.default_rng(_seq(world.seed, r, i, 0x6A55)))
                deltas[i] = attack.poison_update(own, info)
        updates, weights = [], []
        for i in range(n):
            if _finite(deltas[i]):
                updates.append(deltas[i])
                weights.append(float(len(world.train[i])))
            else:
                dropped += 1
        if len(updates) < need:
            skipped += 1
            continue
        agg = rule.aggregate(updates, weights)
        if not _finite(agg):
            skipped += 1
            continue
        for k, v in agg.items():
            if np.issubdtype(state[k].dtype, np.floating):
                state[k] = (state[k] + config.server_lr * v).astype(state[k].dtype)
    _load(world.model, state)
    dice = float(evaluate(world.model, world.test, world.plan).get("dice", 0.0))
    success = backdoor_success(world.model, world.triggered)
    return _Run(dice=dice, success=success, seconds=time.perf_counter() - start, skipped_rounds=skipped,
                dropped_updates=dropped, args=args)


# --------------------------------------------------------------------------------------------- the benchmark


def _plan(config: BenchConfig):
    from pipelines.plan import parse_plan

    return parse_plan({
        "name": "bench-robustness", "task": "seg2d",
        "model": {"network": "UNet", "args": {"channels": list(config.channels), "strides": list(config.strides),
                                             "num_res_units": 0}},
        "training": {"local_epochs": config.local_epochs, "batch_size": config.batch_size, "loss": "dice_ce",
                     "optimizer": {"name": config.optimizer, "lr": config.lr, "momentum": 0.9}},
        "privacy": {"enabled": bool(config.dp)},
        "federation": {"rounds": config.rounds, "server_lr": config.server_lr},
    })


def _choose(given: Sequence[str] | None, available: Sequence[str], what: str) -> list[str]:
    if given is None:
        return list(available)
    out = []
    for name in given:
        if name not in available:
            raise ConfigError(f"unknown {what} {name!r}", fix=f"use some of: {', '.join(available)}")
        if name not in out:
            out.append(name)
    return out


def _row(case: str, metric: str, value: float, baseline: str | None = None, base_value: float | None = None) -> dict[str, Any]:
    ratio = None
    if baseline is not None and base_value is not None and base_value != 0 and math.isfinite(base_value):
        ratio = round(value / base_value, 4)
    return {"case": case, "metric": metric, "value": round(float(value), 4), "baseline": baseline, "ratio": ratio}


def run_robustness_bench(*, silos: int = 10, malicious: int = 2, rounds: int | None = None, seeds: int = 3,
                         attacks: list[str] | None = None, rules: list[str] | None = None, progress: bool = False,
                         config: BenchConfig | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Run the grid and return ``{"bench": "robustness", "params", "machine", "rows"}`` (module docstring).

    Args:
        silos: silos in the federation (>= 2).
        malicious: how many of them attack (1 .. silos - 1); chosen at random per seed.
        rounds: federated rounds (None: ``config.rounds``).
        seeds: repetitions with different data, model initialisation and attacker choice.
        attacks: names from :data:`fedsilo.attacks.ATTACKS` (None: all); ``none`` is always run.
        rules: names from :data:`coordinator.aggregation.RULES` (None: all registered); ``fedavg/none`` is
            always run (the baseline). A rule that cannot run with ``silos`` updates is skipped and named
            in ``params.skipped_rules``.
        progress: print one line per finished cell (all its seeds) to stderr.
        config: sizes and training settings (tests use a tiny one).
        log: where progress lines go (default: stderr).
    """
    import torch

    from coordinator.aggregation import RULES
    from pipelines.networks import build_network

    for name, value, low in (("silos", silos, 2), ("malicious", malicious, 1), ("seeds", seeds, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"--{name} {value!r} is too small", fix=f"use {low} or more")
    if malicious >= silos:
        raise ConfigError(f"--malicious {malicious} leaves no honest silo among {silos}", fix="use fewer malicious silos")
    config = config or BenchConfig()
    if rounds is not None:
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise ConfigError(f"--rounds {rounds!r} is too small", fix="use 1 or more")
        config = replace(config, rounds=rounds)
    attack_names = _choose(attacks, list(ATTACKS), "attack")
    if "none" in attack_names:
        attack_names.remove("none")
    attack_names.insert(0, "none")
    rule_names = _choose(rules, list(RULES), "rule")
    emit = log or (lambda line: print(line, file=sys.stderr, flush=True))

    started = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        plan = _plan(config)
        model = build_network(plan, seed=0)
        worlds = [_World(s, silos, malicious, config, plan, model) for s in range(seeds)]
        setup_seconds = time.perf_counter() - started
        cells: dict[tuple[str, str], list[_Run]] = {}
        skipped_rules: dict[str, str] = {}
        rule_args_used: dict[str, dict] = {}
        rule_notes: dict[str, str] = {}
        grid = [(r, "none") for r in rule_names]
        if "fedavg" not in rule_names:
            grid.insert(0, ("fedavg", "none"))
        grid += [(r, a) for a in attack_names if a != "none" for r in rule_names]
        attack_objs = {a: build_attack(a) for a in attack_names}
        for rule_name, attack_name in grid:
            if rule_name in skipped_rules:
                continue
            try:
                runs = [_run(w, rule_name, attack_objs[attack_name], malicious) for w in worlds]
            except ConfigError as exc:
                skipped_rules[rule_name] = exc.one_line()
                if progress:
                    emit(f"robustness: {rule_name} skipped ({exc.one_line()})")
                continue
            cells[(rule_name, attack_name)] = runs
            if rule_name not in rule_args_used:
                args = {k: ("ref_norm_per_seed" if k in ("tau", "max_norm") else v) for k, v in runs[0].args.items()}
                rule_args_used[rule_name] = args
                if isinstance(args.get("f"), int) and args["f"] < malicious:
                    rule_notes[rule_name] = (f"configured for f={args['f']} (the most it accepts with {silos} silos) "
                                             f"although {malicious} silos attack")
            if progress:
                dice = [r.dice for r in runs]
                extra = f", backdoor success {statistics.fmean(r.success for r in runs):.2f}" if attack_name == "backdoor" else ""
                emit(f"robustness: {rule_name}/{attack_name}: dice mean {statistics.fmean(dice):.3f} worst {min(dice):.3f}"
                     f"{extra} ({sum(r.seconds for r in runs):.1f}s, {len(runs)} seeds)")
    finally:
        torch.set_num_threads(threads_before)
    wall = time.perf_counter() - started
    return _result(cells, config=config, silos=silos, malicious=malicious, seeds=seeds, attack_names=attack_names,
                   rule_names=rule_names, skipped_rules=skipped_rules, rule_args_used=rule_args_used, worlds=worlds,
                   wall=wall, setup_seconds=setup_seconds, attack_objs=attack_objs, rule_notes=rule_notes)


def _result(cells, *, config, silos, malicious, seeds, attack_names, rule_names, skipped_rules, rule_args_used, worlds,
            wall, setup_seconds, attack_objs, rule_notes) -> dict:
    import monai
    import torch

    def mean(key):
        return statistics.fmean(r.dice for r in cells[key])

    def worst(key):
        return min(r.dice for r in cells[key])

    base = ("fedavg", "none")
    base_mean = mean(base) if base in cells else None
    base_worst = worst(base) if base in cells else None
    rows: list[dict[str, Any]] = []
    for (rule, attack), runs in cells.items():
        case = f"{rule}/{attack}"
        rows.append(_row(case, "dice_mean", mean((rule, attack)), BASELINE, base_mean))
        rows.append(_row(case, "dice_worst", worst((rule, attack)), BASELINE, base_worst))
    for (rule, attack), runs in cells.items():
        if attack == "none" and "backdoor" in attack_names:
            rows.append(_row(f"{rule}/none", "success_rate", statistics.fmean(r.success for r in runs)))
        if attack == "backdoor":
            clean = cells.get((rule, "none"))
            rows.append(_row(f"{rule}/backdoor", "success_rate", statistics.fmean(r.success for r in runs),
                             f"{rule}/none" if clean else None,
                             statistics.fmean(r.success for r in clean) if clean else None))
    per_rule: dict[str, tuple[float, str]] = {}
    for (rule, attack), runs in cells.items():
        if rule not in rule_names:
            continue
        w = min(r.dice for r in runs)
        if rule not in per_rule or w < per_rule[rule][0]:
            per_rule[rule] = (w, attack)
    for rule, (w, _attack) in per_rule.items():
        rows.append(_row(f"{rule}/all-attacks", "dice_worst", w, BASELINE, base_worst))

    summary: dict[str, Any] = {"baseline": BASELINE, "goal": f"best robust rule's dice_worst over all attacks and seeds "
                               f"within {GOAL_GAP_POINTS:g} Dice points of {BASELINE}'s dice_worst, and fedavg losing "
                               f">= {BREAK_POINTS:g} points of dice_mean under at least one attack"}
    robust = {r: v for r, v in per_rule.items() if r != "fedavg"}
    breaks = []
    if base_mean is not None:
        breaks = [a for a in attack_names if a != "none" and ("fedavg", a) in cells
                  and (base_mean - mean(("fedavg", a))) * 100 >= BREAK_POINTS]
    summary["fedavg_breaks_under"] = breaks
    if robust and base_worst is not None:
        best = max(robust, key=lambda r: robust[r][0])
        gap = (base_worst - robust[best][0]) * 100
        summary.update(best_robust_rule=best, best_robust_dice_worst=round(robust[best][0], 4),
                       its_worst_attack=robust[best][1], gap_points=round(gap, 2),
                       goal_met=bool(gap <= GOAL_GAP_POINTS and breaks))
        rows.append(_row("summary/best-robust", "dice_worst", robust[best][0], BASELINE, base_worst))
        rows.append(_row("summary/gap-to-clean-fedavg", "dice_points", gap))
        rows.append(_row("summary/goal-met", "bool", 1.0 if summary["goal_met"] else 0.0))
    else:
        summary.update(best_robust_rule=None, goal_met=None)
    rows.append(_row("total", "wall_seconds", wall))

    run_seconds = [r.seconds for runs in cells.values() for r in runs]
    notes = {f"{rule}/{attack}": {"skipped_rounds": sum(r.skipped_rounds for r in runs),
                                  "dropped_updates": sum(r.dropped_updates for r in runs)}
             for (rule, attack), runs in cells.items() if any(r.skipped_rounds or r.dropped_updates for r in runs)}
    params = {
        "silos": silos, "malicious": malicious, "seeds": seeds, "rounds": config.rounds,
        "attacks": attack_names, "rules": [r for r in rule_names if r not in skipped_rules],
        "task": f"seg2d {config.size}x{config.size} synthetic, {config.train_cases} train cases per silo, "
                f"{config.test_cases * silos} pooled test cases",
        "network": f"UNet channels={list(config.channels)} strides={list(config.strides)}",
        "training": f"{config.local_epochs} local epoch, batch {config.batch_size}, {config.optimizer} lr {config.lr}, "
                    f"server_lr {config.server_lr}",
        "dp": bool(config.dp),
        "rule_args": rule_args_used,
        "ref_norm_per_seed": [round(w.ref_norm, 4) for w in worlds],
        "malicious_silos_per_seed": [w.malicious for w in worlds],
        "attack_args": {a: attack_objs[a].params() for a in attack_names if a != "none"},
        "backdoor_success": f"trigger square predicted foreground on >= {BACKDOOR_HIT:.0%} of its pixels",
        "seconds_per_run": {"mean": round(statistics.fmean(run_seconds), 3), "max": round(max(run_seconds), 3)} if run_seconds else None,
        "setup_seconds": round(setup_seconds, 2),
        "summary": summary,
    }
    if rule_notes:
        params["rule_notes"] = rule_notes
    if skipped_rules:
        params["skipped_rules"] = skipped_rules
    if notes:
        params["dropped_or_skipped"] = notes
    machine = {"cpus": os.cpu_count(), "torch": torch.__version__, "monai": monai.__version__,
               "torch_threads": config.threads, "python": platform.python_version()}
    return {"bench": "robustness", "params": params, "machine": machine, "rows": rows}


__all__ = ["BACKDOOR_HIT", "BenchConfig", "backdoor_success", "rule_args", "run_robustness_bench"]
