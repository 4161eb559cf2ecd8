"""``fedsilo bench NAME``: benchmarks, each measured against a baseline in the same run.

Each benchmark returns ``{"bench", "params", "machine", "rows"}`` where a row is
``{"case", "metric", "value", "baseline", "ratio"}`` (ratio = value / baseline's value, both
measured in this run; ``None`` where a row has no baseline). The table and ``--json`` carry the
same figures. Timings are medians of several repetitions; peak memory comes from the OS.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from fedsilo.errors import ConfigError


def add_commands(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (a table, or --json)")
    bsub = bench.add_subparsers(dest="bench_name", metavar="NAME", required=True, parser_class=type(bench))
    p = bsub.add_parser("audit", help="audit log: durable appends per second, verify time for many records")
    p.add_argument("--append-records", type=int, default=20_000)
    p.add_argument("--verify-records", type=int, default=1_000_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=_audit)


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


def print_result(result: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    params = ", ".join(f"{k}={v}" for k, v in result["params"].items())
    machine = ", ".join(f"{k}={v}" for k, v in result["machine"].items())
    print(f"bench {result['bench']} ({params}) on {machine}")
    header = ("case", "metric", "value", "baseline", "ratio")
    rows = [(r["case"], r["metric"], _fmt(r["value"]), r["baseline"] or "-", _fmt(r["ratio"])) for r in result["rows"]]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for line in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)).rstrip())


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)
