"""``fedsilo demo``: the main job, on its embedded default plan."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedsilo.errors import ConfigError


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("--sizes takes whole numbers separated by commas, e.g. 120,180,240") from None
    return sizes


def add_commands(sub) -> None:
    p = sub.add_parser("demo", help="three synthetic hospitals, a real TLS federation with DP-SGD, and a pooled baseline")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default: runs/demo)")
    p.add_argument("--plan", type=Path, default=None, help="training plan (default: configs/plans/seg3d-unet-dp.yaml)")
    p.add_argument("--silos", type=int, default=3, help="number of synthetic hospitals (default: 3)")
    p.add_argument("--sizes", type=_sizes, default=None, help="cases per hospital, comma-separated (default: 120,180,240)")
    p.add_argument("--rounds", type=int, default=None, help="override the plan's number of rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=0, help="SuperLink port on 127.0.0.1 (default: a free one)")
    p.add_argument("--no-baseline", action="store_true", help="skip the pooled (non-federated, non-DP) baseline")
    p.add_argument("--engine", choices=("deployment", "simulation"), default="deployment",
                   help="deployment: TLS SuperLink + one SuperNode per silo (default); simulation: Flower's simulation engine (extra 'simulation')")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from fedsilo.demo import DEFAULT_PLAN, DemoOptions, run_demo

    if args.silos < 1:
        raise ConfigError(f"--silos {args.silos} is too few", fix="use 1 or more")
    if args.sizes is not None and len(args.sizes) != args.silos:
        raise ConfigError(f"--sizes gives {len(args.sizes)} sizes for {args.silos} silos", fix="give one size per silo")
    if args.rounds is not None and args.rounds < 1:
        raise ConfigError(f"--rounds {args.rounds} is too few", fix="use 1 or more")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is not a TCP port", fix="use 1024..65535, or 0 for a free one")
    run_demo(DemoOptions(out=args.out, plan=args.plan or DEFAULT_PLAN, silos=args.silos, sizes=args.sizes, seed=args.seed,
                         rounds=args.rounds, baseline=not args.no_baseline, port=args.port, engine=args.engine))
    return 0
