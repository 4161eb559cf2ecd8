"""``fedsilo bench round``: per-round overhead of a real deployment, warm executor against Flower's default.

A round's overhead is what the federation machinery adds on top of the work itself::

    overhead = round wall time - slowest silo's training - slowest silo's evaluation - aggregation

(training and evaluation are two barrier-synchronised phases, so the slowest silo of each counts).
Both modes run the same plan on the same synthetic silos through a real TLS SuperLink and one
authenticated SuperNode per silo on loopback (:class:`fedsilo.local_federation.LocalFederation`):

- ``subprocess``: Flower's default; every message starts a fresh ``flwr-clientapp`` process, which
  imports torch, MONAI and Opacus again (the baseline);
- ``warm``: ``--isolation process`` with :mod:`silo_agent.warm_exec`, which forks each message from a
  process that imported them once.

Each round is one repetition; the median over rounds is quoted. Silo training and evaluation times
come from the silos' replies (``seconds``), aggregation time from the coordinator's round row.

A plain round's model is evaluated in the next round's train messages (coordinator.federation), so its
wall time holds one exchange with the silos, and its overhead subtracts the silos' work on that
message (evaluation and training); the last round's evaluation is an exchange of its own, once per
run (``final_evaluation_seconds_per_run``).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedsilo.errors import ConfigError

DEFAULT_PLAN = Path(__file__).resolve().parent.parent / "configs" / "plans" / "seg3d-unet-dp.yaml"
MODES = ("subprocess", "warm")


def add_bench_command(bsub) -> None:
    p = bsub.add_parser("round", help="per-round overhead of a real TLS deployment: warm executor vs Flower's default subprocess mode")
    p.add_argument("--silos", type=int, default=3, help="number of silos (default 3)")
    p.add_argument("--rounds", type=int, default=5, help="federated rounds per mode; each round is one repetition (default 5)")
    p.add_argument("--plan", type=Path, default=DEFAULT_PLAN, help="the plan to run (default: the demo's seg3d UNet plan)")
    p.add_argument("--cases", type=int, default=None, help="training cases per silo (default: the demo's sizes)")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {', '.join(MODES)} (default both)")
    p.add_argument("--keep", type=Path, default=None, metavar="DIR", help="keep the run folders under DIR (default: a temporary folder, removed)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=_handler)


def _handler(args) -> int:
    from fedsilo.bench_report import print_result

    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ConfigError(f"--modes: unknown mode(s) {', '.join(unknown) or '(none given)'}", fix=f"use some of: {', '.join(MODES)}")
    for name in ("silos", "rounds"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name} {getattr(args, name)} is too small", fix="use 1 or more")
    if args.cases is not None and args.cases < 4:
        raise ConfigError(f"--cases {args.cases} is too small", fix="use 4 or more")
    if not args.plan.is_file():
        raise ConfigError(f"no plan at {args.plan}", fix="give a plan YAML, e.g. configs/plans/seg3d-unet-dp.yaml")
    say = (lambda text: None) if args.json else (lambda text: print(text, file=sys.stderr, flush=True))
    result = run_round_bench(plan_path=args.plan, silos=args.silos, rounds=args.rounds, modes=modes, cases=args.cases,
                             keep=args.keep, say=say)
    print_result(result, as_json=args.json)
    return 0


def round_overhead(row: dict[str, Any]) -> dict[str, float]:
    """Split one round row (from the ServerApp's rounds.jsonl) into wall time, work and overhead.

    A plain round's model is evaluated in the next round's train messages (``evaluation: "with the next round's
    training"``): its wall time holds no evaluation of its own, and each silo's ``train_seconds`` (its whole work on
    the message) includes the previous round's evaluation, so only training and aggregation are subtracted."""
    from coordinator.progress import EVALUATED_WITH_NEXT_ROUND

    sites = row.get("sites") or {}
    train = max((s.get("train_seconds") or 0.0) for s in sites.values()) if sites else 0.0
    evaluate = max((s.get("eval_seconds") or 0.0) for s in sites.values()) if sites else 0.0
    aggregate = float(row.get("aggregate_seconds") or 0.0)
    wall = float(row["seconds"])
    inside = 0.0 if row.get("evaluation") == EVALUATED_WITH_NEXT_ROUND else evaluate
    return {"wall": wall, "train": train, "evaluate": evaluate, "aggregate": aggregate, "overhead": wall - train - inside - aggregate,
            "evaluate_inside": inside}


def _run_mode(root: Path, plan_path: Path, mode: str, *, silos: int, rounds: int, cases: int | None, say) -> tuple[list[dict[str, float]], float]:
    """Per-round splits of one run, and the seconds of its last round's own evaluation exchange (0: none)."""
    from fedsilo.demo import make_sites, sign_and_approve
    from fedsilo.local_federation import LocalFederation, SiloSpec
    from pipelines.plan import load_plan, parse_plan

    plan = load_plan(plan_path)
    raw = plan.to_dict()
    raw["federation"]["rounds"] = rounds
    raw["federation"]["min_silos"] = min(raw["federation"]["min_silos"], silos)
    plan = parse_plan(raw)
    root.mkdir(parents=True, exist_ok=True)
    local_plan = root / "plan.yaml"
    local_plan.write_text(plan.to_yaml(), encoding="utf-8")
    sizes = tuple([cases] * silos) if cases else None
    sites = make_sites(root, plan.task, silos=silos, sizes=sizes, seed=0, say=lambda text: None)
    bundle = sign_and_approve(root, local_plan, sites)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    with LocalFederation(root, [SiloSpec(s.site_id, s.root) for s in sites], isolation=mode) as federation:
        say(f"  {mode}: federation up in {time.perf_counter() - start:.1f} s; running {rounds} round(s)")
        federation.run_plan(bundle, root / "run", on_evaluated=rows.append)
    split = [round_overhead(r) for r in rows]
    for i, s in enumerate(split, 1):
        where = f"evaluate {s['evaluate']:.1f} + " if s["evaluate_inside"] else ""
        beside = "" if s["evaluate_inside"] else f" (evaluation {s['evaluate']:.1f} s in the next round's training)"
        say(f"  {mode}: round {i}: wall {s['wall']:.1f} s = train {s['train']:.1f} + {where}aggregate {s['aggregate']:.2f} + "
            f"overhead {s['overhead']:.1f}{beside}")
    return split, (float(rows[-1].get("final_evaluation_seconds") or 0.0) if rows else 0.0)


def run_round_bench(*, plan_path: Path = DEFAULT_PLAN, silos: int = 3, rounds: int = 5, modes: list[str] | None = None,
                    cases: int | None = None, keep: Path | None = None, say=lambda text: None) -> dict[str, Any]:
    """Run the plan once per mode and return ``{"bench": "round", "params", "machine", "rows"}``."""
    import torch

    modes = list(modes or MODES)
    results: dict[str, list[dict[str, float]]] = {}
    final_evaluation: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="fedsilo-bench-round-") as tmp:
        base = keep.resolve() if keep else Path(tmp)
        for mode in modes:
            say(f"bench round: {mode} mode, {silos} silos, {rounds} rounds")
            results[mode], final_evaluation[mode] = _run_mode(base / mode, plan_path, mode, silos=silos, rounds=rounds, cases=cases, say=say)
    rows = []
    baseline = "subprocess" if "subprocess" in results else None
    medians = {mode: {k: statistics.median(s[k] for s in split) for k in split[0]} for mode, split in results.items()}
    for mode in modes:
        for metric in ("overhead", "wall"):
            value = medians[mode][metric]
            base_value = medians[baseline][metric] if baseline and mode != baseline else None
            rows.append({"case": mode, "metric": f"{metric}_seconds_per_round", "value": round(value, 3),
                         "baseline": baseline if base_value is not None else None,
                         "ratio": round(value / base_value, 3) if base_value else None})
        for metric in ("train", "evaluate", "aggregate"):
            rows.append({"case": mode, "metric": f"{metric}_seconds_per_round", "value": round(medians[mode][metric], 3),
                         "baseline": None, "ratio": None})
        rows.append({"case": mode, "metric": "final_evaluation_seconds_per_run", "value": round(final_evaluation[mode], 3),
                     "baseline": None, "ratio": None})
    return {
        "bench": "round",
        "params": {"plan": plan_path.name, "silos": silos, "rounds": rounds, "cases": cases, "modes": modes,
                   "per_round": {mode: [{k: round(v, 3) for k, v in s.items()} for s in split] for mode, split in results.items()}},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
        "rows": rows,
    }

