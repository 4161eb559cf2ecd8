"""``fedsilo bench NAME``: benchmarks, each measured against a baseline in the same run.

Each benchmark returns ``{"bench", "params", "machine", "rows"}`` where a row is
``{"case", "metric", "value", "baseline", "ratio"}`` (ratio = value / baseline's value, both
measured in this run; ``None`` where a row has no baseline). The table and ``--json`` carry the
same figures. Timings are medians of several repetitions; peak memory comes from the OS.
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from fedsilo.bench_report import print_result  # noqa: F401 - benchmarks print through it
from fedsilo.errors import ConfigError

# Benchmarks that live beside the code they measure register themselves: each module has
# ``add_bench_command(bench_subparsers)`` and keeps its heavy imports inside its handler.
BENCH_MODULES = (
    "pipelines.ingest_bench",
    "fedsilo.utility_bench",
    "fedsilo.round_bench",
    "fedsilo.comm_bench",
)


def add_commands(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (a table, or --json)")
    bsub = bench.add_subparsers(dest="bench_name", metavar="NAME", required=True, parser_class=type(bench))
    p = bsub.add_parser("audit", help="audit log: durable appends per second, verify time for many records")
    p.add_argument("--append-records", type=int, default=20_000)
    p.add_argument("--verify-records", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=_audit)

    p = bsub.add_parser("aggregate", help="aggregation rules: time and peak memory against the plain mean, a copy, and Flower's strategies")
    p.add_argument("--n", type=int, default=10, help="number of updates (default 10)")
    p.add_argument("--d", type=int, default=30_000_000, help="float32 parameters per update (default 30,000,000)")
    p.add_argument("--f", type=int, default=2, help="Byzantine updates the robust rules are set to tolerate (default 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=_aggregate)

    p = bsub.add_parser("dp", help="DP-SGD cost: step time and peak memory with and without DP, per network and Opacus mode")
    p.add_argument("--networks", default=None, help="comma-separated allow-listed networks (default: all)")
    p.add_argument("--batch-sizes", default="8,16,32", help="comma-separated batch sizes (default 8,16,32)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per case, after warm-up (median quoted)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: cuda when available")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=_dp)

    p = bsub.add_parser("robustness", help="synthetic federation under attack: final Dice per attack and rule")
    p.add_argument("--silos", type=int, default=10)
    p.add_argument("--malicious", type=int, default=2, help="how many of the silos attack (default 2)")
    p.add_argument("--rounds", type=int, default=None, help="federated rounds (default: the harness's short setting)")
    p.add_argument("--seeds", type=int, default=3, help="repetitions with different seeds (default 3)")
    p.add_argument("--attacks", default=None, help="comma-separated attacks (default: all)")
    p.add_argument("--rules", default=None, help="comma-separated rules (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=_robustness)

    for name in BENCH_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a benchmark not built yet must not break the others
            if exc.name != name:
                raise
            continue
        module.add_bench_command(bsub)


def _positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {value} is too small", fix="use 1 or more")


def _audit(args: argparse.Namespace) -> int:
    from compliance.bench import run_audit_bench

    _positive(append_records=args.append_records, verify_records=args.verify_records, repeats=args.repeats)
    result = run_audit_bench(append_records=args.append_records, verify_records=args.verify_records, repeats=args.repeats)
    print_result(result, as_json=args.json)
    return 0


def _aggregate(args: argparse.Namespace) -> int:
    from coordinator.aggregation_bench import run_aggregate_bench

    _positive(n=args.n, d=args.d, repeats=args.repeats)
    result = run_aggregate_bench(n=args.n, d=args.d, f=args.f, repeats=args.repeats, seed=args.seed)
    print_result(result, as_json=args.json)
    return 0


def _dp(args: argparse.Namespace) -> int:
    from pipelines.dp_bench import run_dp_bench

    _positive(repeats=args.repeats)
    sizes = []
    for text in _names(args.batch_sizes) or []:
        if not text.isdigit() or int(text) < 1:
            raise ConfigError(f"--batch-sizes: '{text}' is not a whole number >= 1", fix="e.g. --batch-sizes 8,16,32")
        sizes.append(int(text))
    result = run_dp_bench(networks=_names(args.networks), batch_sizes=sizes, repeats=args.repeats, device=args.device,
                          progress=not args.json)
    print_result(result, as_json=args.json)
    return 0


def _robustness(args: argparse.Namespace) -> int:
    from fedsilo.robustness import run_robustness_bench

    _positive(silos=args.silos, seeds=args.seeds)
    if args.rounds is not None:
        _positive(rounds=args.rounds)
    result = run_robustness_bench(
        silos=args.silos, malicious=args.malicious, rounds=args.rounds, seeds=args.seeds,
        attacks=_names(args.attacks), rules=_names(args.rules), progress=not args.json,
    )
    print_result(result, as_json=args.json)
    return 0


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise ConfigError("an empty list was given", fix="name at least one, comma-separated")
    return names
