"""A benchmark's result as a table or as one JSON object (the format is in ../shared/DESIGN.md).

Part of the shared kernel: it imports nothing of the project, so every package's benchmark module
(pipelines, coordinator, compliance, fedsilo) can print through it.
"""

from __future__ import annotations

import json
import math
from typing import Any


def print_result(result: dict[str, Any], *, as_json: bool) -> None:
    if as_json:
        print(json.dumps(result))
        return
    # Nested parameters (per-rule arguments, summaries) are in --json; the header keeps the scalar ones.
    params = ", ".join(f"{k}={v}" for k, v in result["params"].items() if not isinstance(v, (dict, list)))
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
