"""``fedsilo bench aggregate``: every registered aggregation rule against the plain mean, a copy, and Flower.

``run_aggregate_bench`` returns the benchmark object of DESIGN.md ("Formats"). On ``n`` random float32
updates of ``d`` parameters (one tensor each; update ``i`` is a shared random vector plus noise of its
own scale, so Krum's scores are well separated) it measures, each as the median of ``repeats`` runs
after one warm-up:

- ``copy``: copying all ``n * d`` input bytes once into a preallocated buffer (the memory-traffic floor);
- ``mean``: ``coordinator.aggregation.fedavg.weighted_mean`` (baseline: copy);
- every rule in ``coordinator.aggregation.RULES`` (rules registered later appear by themselves), in
  seconds against the mean and against the copy; rules taking ``f`` get the largest ``f' <= f`` that ``n``
  allows (Bulyan needs ``n >= 4f + 3``); a rule whose arguments this bench does not know is built with
  its defaults, and skipped with a row saying why when that fails;
- Flower's ``FedMedian``, ``FedTrimmedAvg``, ``Krum``, ``MultiKrum`` and ``Bulyan`` on the same inputs
  with the same settings: only ``strategy.aggregate_train(...)`` is timed (it includes Flower's
  deserialisation of the reply ``ArrayRecord``s, which is part of its aggregation path; building the
  reply messages is not timed), and each of our rules against its Flower twin;
- the peak extra resident memory of each case (Linux: the process's peak RSS, ``VmHWM``, is reset
  through ``/proc/self/clear_refs`` before the case's warm-up run and read after it, minus the RSS
  before it; the inputs are not counted), against the mean's;
- the maximum relative difference between our rule and Flower's (``max |ours - flower| / max |flower|``
  over all coordinates), which should be at most 1e-6. For Bulyan the coordinates where Flower's float32
  distances to the median tie at the cut (so that ``numpy.argpartition`` picks arbitrarily which value
  Flower keeps, see ``coordinator.aggregation.bulyan``) are left out of that row and counted in
  another; a third row gives the difference over all coordinates.
"""

from __future__ import annotations

import gc
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from coordinator.aggregation import RULES, build_rule
from coordinator.aggregation.fedavg import weighted_mean
from fedsilo.errors import ConfigError, FedsiloError

TRIMMED_BETA = 0.2
# (f, the median L2 norm of the inputs) -> the rule's arguments. The clipping rules get the median norm as
# their radius, so that about half the updates are clipped: the work a real round does.
KNOWN_ARGS: dict[str, Callable[[int, float], dict[str, Any]]] = {
    "fedavg": lambda f, norm: {},
    "median": lambda f, norm: {},
    "trimmed_mean": lambda f, norm: {"beta": TRIMMED_BETA},
    "krum": lambda f, norm: {"f": f},
    "multikrum": lambda f, norm: {"f": f},
    "bulyan": lambda f, norm: {"f": f},
    "geometric_median": lambda f, norm: {},
    "centered_clipping": lambda f, norm: {"tau": round(norm, 3)},
    "norm_bounded_mean": lambda f, norm: {"max_norm": round(norm, 3)},
}
FLOWER_TWINS = {"median": "FedMedian", "trimmed_mean": "FedTrimmedAvg", "krum": "Krum", "multikrum": "MultiKrum",
                "bulyan": "Bulyan"}
KEY = "params"  # the one tensor's name


def make_inputs(n: int, d: int, seed: int) -> tuple[list[dict[str, np.ndarray]], list[float]]:
    """``n`` float32 updates ``{KEY: base + s_i * noise_i}`` with distinct scales ``s_i``, and positive weights."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(d, dtype=np.float32)
    scales = rng.permutation(np.linspace(0.5, 1.5, n))
    updates = []
    for s in scales:
        u = rng.standard_normal(d, dtype=np.float32)
        u *= np.float32(s)
        u += base
        updates.append({KEY: u})
    weights = [float(w) for w in rng.uniform(1.0, 100.0, n)]
    return updates, weights


def rule_args(name: str, f: int, n: int, norm: float = 1.0) -> dict[str, Any] | None:
    """Arguments for a registered rule at this ``f``, ``n`` and median input norm (None: unknown rule, use its defaults)."""
    known = KNOWN_ARGS.get(name)
    if known is None:
        return None
    args = known(f, norm)
    if "f" in args:
        while args["f"] > 0 and build_rule(name, args).min_updates() > n:
            args = known(args["f"] - 1, norm)
    return args


def _label(name: str, args: dict[str, Any] | None) -> str:
    if not args:
        return name
    return f"{name} ({', '.join(f'{k}={v}' for k, v in args.items())})"


def flower_strategy(name: str, args: dict[str, Any], n: int):
    """Flower's strategy (``flwr.serverapp.strategy``) configured like our rule ``name`` with ``args``."""
    from flwr.serverapp import strategy as fs

    f = args.get("f", 0)
    common = {"min_train_nodes": 1, "min_available_nodes": 1}
    if name == "median":
        return fs.FedMedian(**common)
    if name == "trimmed_mean":
        return fs.FedTrimmedAvg(beta=args.get("beta", TRIMMED_BETA), **common)
    if name == "krum":
        return fs.Krum(num_malicious_nodes=f, **common)
    if name == "multikrum":
        m = args.get("m") or n - f
        return fs.MultiKrum(num_malicious_nodes=f, num_nodes_to_select=m, **common)
    if name == "bulyan":
        return fs.Bulyan(num_malicious_nodes=f, **common)
    raise ValueError(f"no Flower twin for rule {name!r}")


def flower_replies(updates: list[Mapping[str, np.ndarray]], weights: list[float]) -> list:
    """Training replies as Flower's strategies receive them: one ArrayRecord and a MetricRecord with num-examples."""
    from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

    replies = []
    for i, (u, w) in enumerate(zip(updates, weights)):
        content = RecordDict({"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in u.items()}),
                              "metrics": MetricRecord({"num-examples": w})})
        # a reply as the ServerApp receives it (explicit metadata: no run context is needed)
        meta = Metadata(run_id=1, message_id=f"reply-{i}", src_node_id=i + 1, dst_node_id=0,
                        reply_to_message_id=f"train-{i}", group_id="1", created_at=time.time(), ttl=3600.0,
                        message_type="train")
        replies.append(Message(content, metadata=meta))
    return replies


def flower_aggregate(strategy, replies: list) -> dict[str, np.ndarray]:
    """Run Flower's aggregation (``aggregate_train``; it consumes the replies' arrays) and return numpy arrays."""
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.WARNING)
    try:
        arrays, _ = strategy.aggregate_train(1, replies)
    finally:
        flwr_logger.setLevel(level)
    if arrays is None:
        raise ConfigError("Flower's strategy returned no aggregate", fix="check n against the strategy's requirements")
    return {k: v.numpy() for k, v in arrays.items()}


def max_relative_difference(ours: Mapping[str, np.ndarray], theirs: Mapping[str, np.ndarray],
                            skip: Mapping[str, np.ndarray] | None = None) -> float:
    """``max |ours - theirs| / max |theirs|`` over all tensors (float64); ``skip``: flat masks of coordinates to leave out."""
    diff = 0.0
    scale = 0.0
    for k, t in theirs.items():
        t = np.asarray(t, dtype=np.float64).reshape(-1)
        delta = np.abs(np.asarray(ours[k], dtype=np.float64).reshape(-1) - t)
        if skip is not None:
            delta[skip[k]] = 0.0
        diff = max(diff, float(np.max(delta, initial=0.0)))
        scale = max(scale, float(np.max(np.abs(t), initial=0.0)))
    return diff / scale if scale > 0 else diff


def bulyan_rounding_ties(updates: list[Mapping[str, np.ndarray]], selected: list[int], beta: int,
                         chunk: int = 1 << 20) -> dict[str, np.ndarray]:
    """Flat masks of the coordinates where Flower's Bulyan must break a tie: the ``beta``-th and
    ``beta + 1``-th smallest of its float32 distances ``|x - median|`` are equal, so which value it
    keeps is up to ``numpy.argpartition``."""
    masks = {}
    for k in updates[0]:
        srcs = [np.asarray(updates[i][k]).reshape(-1) for i in selected]
        mask = np.zeros(srcs[0].size, dtype=bool)
        if beta < len(srcs):
            for start in range(0, mask.size, chunk):
                x = np.stack([s[start:start + chunk] for s in srcs])
                dist = np.sort(np.abs(x - np.median(x, axis=0)), axis=0)
                mask[start:start + chunk] = dist[beta - 1] == dist[beta]
        masks[k] = mask
    return masks


class _Peak:
    """Peak extra RSS of a block, from the OS (Linux: VmHWM after resetting it through clear_refs)."""

    def __init__(self) -> None:
        self.ok = self._reset()

    @staticmethod
    def _status(field: str) -> int:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        raise OSError(field)

    def _reset(self) -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self._status("VmHWM")
            return True
        except OSError:
            return False

    def measure(self, fn: Callable[[], Any]) -> tuple[Any, float | None]:
        if not self.ok or not self._reset():
            return fn(), None
        before = self._status("VmRSS")
        result = fn()
        return result, max(0, self._status("VmHWM") - before) / 2**20


def _sig(value: float) -> float:
    return float(f"{value:.6g}")


def _row(case: str, metric: str, value: float | None, baseline: str | None = None,
         baseline_value: float | None = None) -> dict[str, Any]:
    """A row; value and baseline value are rounded to 6 significant digits first, so ratio = value / baseline."""
    if value is not None:
        value = _sig(value)
    if baseline_value is not None:
        baseline_value = _sig(baseline_value)
    ratio = round(value / baseline_value, 3) if baseline is not None and value is not None and baseline_value else None
    if ratio is None:
        baseline = None  # DESIGN.md: a row without a ratio names no baseline (e.g. a baseline that measured 0)
    return {"case": case, "metric": metric, "value": value, "baseline": baseline, "ratio": ratio}


def _progress(text: str, verbose: bool) -> None:
    if verbose:
        print(f"bench aggregate: {text}", file=sys.stderr, flush=True)


def run_aggregate_bench(*, n: int, d: int, f: int, repeats: int, seed: int) -> dict[str, Any]:
    """Measure every registered rule; returns ``{"bench": "aggregate", "params", "machine", "rows"}``."""
    import flwr
    import torch

    for name, value, low in (("n", n, 1), ("d", d, 1), ("repeats", repeats, 1), ("f", f, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{name} must be a whole number >= {low}, not {value!r}")
    verbose = big = n * d >= 50_000_000  # progress on stderr only for long runs
    peak = _Peak()
    updates, weights = make_inputs(n, d, seed)
    rows: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    memory: dict[str, float | None] = {}

    def timed(case: str, fn: Callable[[], Any], prepare: Callable[[], Any] | None = None) -> Any:
        """Warm-up (peak memory measured there), then the median of ``repeats`` timed runs."""
        _progress(case, verbose)
        if big:
            gc.collect()  # ~0.2 s with torch and Flower loaded: only where the inputs are large
        arg = prepare() if prepare else None
        result, memory[case] = peak.measure(lambda: fn(arg) if prepare else fn())
        times = []
        for _ in range(repeats):
            arg = prepare() if prepare else None
            start = time.perf_counter()
            out = fn(arg) if prepare else fn()
            times.append(time.perf_counter() - start)
            del out
        seconds[case] = statistics.median(times)
        return result

    flat = [u[KEY] for u in updates]
    dest = np.empty(n * d, dtype=np.float32)
    dest[:] = 0  # touch the pages: the copy measures memory traffic, not page faults
    timed("copy", lambda: np.concatenate(flat, out=dest))
    del dest
    rows.append(_row("copy", "seconds", seconds["copy"]))
    timed("mean", lambda: weighted_mean(zip(updates, weights)))
    rows.append(_row("mean", "seconds", seconds["mean"], "copy", seconds["copy"]))
    mem_rows = [_row("mean", "peak extra MiB", memory["mean"])]

    median_norm = float(np.median([np.linalg.norm(u[KEY]) for u in updates]))
    agreements: list[dict[str, Any]] = []
    versus: list[dict[str, Any]] = []
    for name in RULES:
        if name == "fedavg":
            continue  # the plain mean above
        args = rule_args(name, f, n, median_norm)
        case = _label(name, args)
        try:
            rule = build_rule(name, args or {})
            need = rule.min_updates() if hasattr(rule, "min_updates") else 1
            if need > n:
                raise ConfigError(f"needs at least {need} updates, the bench has n={n}")
            ours = timed(case, lambda: rule.aggregate(updates, weights))
        except (FedsiloError, TypeError, ValueError) as exc:  # e.g. a rule registered later that needs arguments
            why = exc.one_line() if isinstance(exc, FedsiloError) else f"{type(exc).__name__}: {exc}"
            rows.append(_row(f"{case}: skipped ({why})", "skipped", None))
            continue
        rows.append(_row(case, "seconds", seconds[case], "mean", seconds["mean"]))
        rows.append(_row(case, "seconds", seconds[case], "copy", seconds["copy"]))
        mem_rows.append(_row(case, "peak extra MiB", memory[case], "mean", memory["mean"]))
        twin = FLOWER_TWINS.get(name)
        if twin is None:
            del ours
            continue
        fcase = f"flower {twin}" + (f" ({case[len(name) + 2:-1]})" if args else "")
        strategy = flower_strategy(name, args or {}, n)
        theirs = timed(fcase, lambda replies: flower_aggregate(strategy, replies),
                       prepare=lambda: flower_replies(updates, weights))
        rows.append(_row(fcase, "seconds", seconds[fcase], "mean", seconds["mean"]))
        rows.append(_row(fcase, "seconds", seconds[fcase], "copy", seconds["copy"]))
        mem_rows.append(_row(fcase, "peak extra MiB", memory[fcase], "mean", memory["mean"]))
        versus.append(_row(case, "seconds", seconds[case], fcase, seconds[fcase]))
        pair = f"{case} vs {fcase}"
        if name == "bulyan":
            ties = bulyan_rounding_ties(updates, rule.details["selected"], rule.details["beta"])
            agreements.append(_row(pair, "max relative difference", max_relative_difference(ours, theirs, ties)))
            agreements.append(_row(pair, "coordinates left out: Flower's float32 distance ties",
                                   float(sum(int(m.sum()) for m in ties.values()))))
            agreements.append(_row(pair, "max relative difference, all coordinates",
                                   max_relative_difference(ours, theirs)))
            del ties
        else:
            agreements.append(_row(pair, "max relative difference", max_relative_difference(ours, theirs)))
        del ours, theirs
    rows.extend(versus)
    if peak.ok:
        rows.extend(mem_rows)
    else:
        rows.append(_row("peak memory: skipped (needs Linux /proc/self/clear_refs)", "skipped", None))
    rows.extend(agreements)
    return {
        "bench": "aggregate",
        "params": {"n": n, "d": d, "f": f, "repeats": repeats, "seed": seed, "dtype": "float32",
                   "input_mib": round(n * d * 4 / 2**20, 1), "trimmed_mean_beta": TRIMMED_BETA},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(), "numpy": np.__version__, "flwr": flwr.__version__,
                    "platform": platform.platform()},
        "rows": rows,
    }
