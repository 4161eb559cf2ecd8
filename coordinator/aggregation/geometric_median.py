"""Geometric median of silo updates: RFA (Pillutla, Kakade, Harchaoui 2022, "Robust Aggregation
for Federated Learning", IEEE TSP; arXiv:1912.13075), smoothed Weiszfeld with weights.

The aggregate minimises g(z) = sum_i alpha_i * max(nu, ||z - u_i||)-smoothed distances, alpha_i the
silo weights normalised to sum 1, ||.|| the L2 norm over the concatenation of all tensors. Its
breakdown point is 1/2: if the honest silos hold more than half the weight, the outliers can move
it only a bounded distance, whatever their size.

Each Weiszfeld iterate is a convex combination z = sum_j b_j u_j of the updates, so
||z - u_i||^2 = b'Gb - 2 (Gb)_i + G_ii with G the n x n Gram matrix of the updates. One streamed
pass builds G in float64 (O(n^2 d)); then every iteration costs O(n^2), and a second pass
materialises only the final z. Because iterations are nearly free, the default ``max_iter`` is
large: with a huge outlier Weiszfeld converges only linearly, at about the outliers' share of the
weight over the honest share per iteration (RFA itself uses few iterations because each one is a
secure-aggregation round there, not because few suffice).

Stopping rule: the step ||z_{k+1} - z_k|| is at most ``tol`` times the weighted median of the
distances from z_{k+1} to the updates (an honest-scale length when honest weight > 1/2), where
the step is counted with its own rounding error bound. The paper's relative-objective rule would
stop early when an outlier of size 1e30 dominates g.

Numerics: G is exact-ish in float64, but ||z - u_i||^2 is a difference of terms of size ||u||^2,
so distances far below 1e-7 * max ||u_i|| are noise (a shared offset much larger than the spread
of the updates loses precision). Updates are deltas from the global model, where this is benign.

This module also holds the streamed helpers (Gram matrix, linear combination, argument checks)
that the other norm-based rules of this package reuse.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from fedsilo.errors import ConfigError, VerificationError

_CHUNK = 1 << 14  # elements per row per streamed block: n x 128 KiB of float64, cache-sized for BLAS


# ---------------------------------------------------------------- argument checks

def check_args(rule: str, args: Mapping[str, object], allowed: Sequence[str]) -> None:
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise ConfigError(f"plan key 'federation.aggregation.args.{unknown[0]}': unknown argument for rule '{rule}'",
                          fix=f"use only: {', '.join(allowed)}" if allowed else "remove the args")


def number_arg(args: Mapping[str, object], key: str, default: float | None, *, low: float = -math.inf,
               low_open: bool = False, high: float = math.inf, integer: bool = False) -> float:
    """Read ``args[key]`` (or ``default``; ``None`` means required) and check low < / <= value <= high."""
    where = f"plan key 'federation.aggregation.args.{key}'"
    if key not in args:
        if default is None:
            raise ConfigError(f"{where} is required", fix=f"set federation.aggregation.args.{key}")
        return default
    value = args[key]
    kind = "a whole number" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        raise ConfigError(f"{where}: {value!r} is not {kind}", fix=f"use {kind}")
    value = int(value) if integer else float(value)
    if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        if high < math.inf:
            bound += f" and <= {high:g}"
        raise ConfigError(f"{where}: {value!r} is out of range", fix=f"use a value {bound}")
    return value


# ---------------------------------------------------------------- streamed linear algebra

def check_updates(updates: Sequence[Mapping[str, np.ndarray]], weights: Sequence[float]) -> tuple[list[str], np.ndarray]:
    """Names of the tensors (in the first update's order) and the weights normalised to sum 1."""
    if not updates:
        raise ConfigError("no updates to aggregate", fix="check that at least one silo replied with a valid update")
    if len(weights) != len(updates):
        raise ConfigError(f"{len(updates)} updates but {len(weights)} weights", fix="pass one weight per update")
    w = np.asarray(weights, dtype=np.float64)
    if not np.all(np.isfinite(w)) or not np.all(w > 0):
        raise ConfigError(f"update weight must be positive, got {[float(x) for x in w if not x > 0 or not math.isfinite(x)][0]}",
                          fix="send num-examples > 0")
    names = list(updates[0])
    for i, u in enumerate(updates[1:], 1):
        if set(u) != set(names) or any(np.shape(u[k]) != np.shape(updates[0][k]) for k in names):
            raise VerificationError(f"update {i} does not have the tensor names and shapes of update 0",
                                    fix="validate updates against the global model before aggregating")
    return names, w / w.sum()


def _blocks(rows: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]):
    """Yield (name, start, stop, B) with B a float64 (n, stop-start) view holding each row's slice."""
    n = len(rows)
    buf = np.empty((n, _CHUNK), dtype=np.float64)
    for name in names:
        flats = [np.asarray(r[name]).reshape(-1) for r in rows]
        size = flats[0].size
        for start in range(0, size, _CHUNK):
            stop = min(start + _CHUNK, size)
            block = buf[:, : stop - start]
            for i, f in enumerate(flats):
                np.copyto(block[i], f[start:stop], casting="unsafe")
            yield name, start, stop, block


def gram_matrix(rows: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]) -> tuple[np.ndarray, float]:
    """(G, s): G[i, j] = s^2 * <row_i, row_j> in float64 over all tensors; s = 1 unless that overflowed."""
    n = len(rows)
    gram = np.zeros((n, n), dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        for _, _, _, block in _blocks(rows, names):
            gram += block @ block.T
    if np.all(np.isfinite(gram)):
        return gram, 1.0
    # Huge (finite) values: rescale by a power of two so the squares fit, then redo.
    peak = max((float(np.max(np.abs(r[k]))) for r in rows for k in names if np.size(r[k])), default=0.0)
    if not math.isfinite(peak):
        raise VerificationError("an update holds NaN or Inf", fix="validate updates before aggregating")
    scale = 2.0 ** -math.ceil(math.log2(peak))
    gram[:] = 0.0
    for _, _, _, block in _blocks(rows, names):
        block *= scale
        gram += block @ block.T
    return gram, scale


def combine(rows: Sequence[Mapping[str, np.ndarray]], names: Sequence[str], coef: np.ndarray) -> dict[str, np.ndarray]:
    """sum_j coef_j * row_j, accumulated in float64, returned in each tensor's own dtype."""
    like = rows[0]
    out = {k: np.empty(np.shape(like[k]), dtype=np.asarray(like[k]).dtype) for k in names}
    flat_out = {k: v.reshape(-1) for k, v in out.items()}
    coef = np.asarray(coef, dtype=np.float64)
    for name, start, stop, block in _blocks(rows, names):
        part = coef @ block
        dst = flat_out[name]
        if not np.issubdtype(dst.dtype, np.inexact):
            part = np.rint(part)
        np.copyto(dst[start:stop], part, casting="unsafe")
    return out


def distances(gram: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """||sum_j coef_j x_j - x_i|| for every i, from the Gram matrix of the x's."""
    g_coef = gram @ coef
    sq = float(coef @ g_coef) - 2.0 * g_coef + np.diag(gram)
    return np.sqrt(np.maximum(sq, 0.0))


def weighted_median(values: np.ndarray, alpha: np.ndarray) -> float:
    order = np.argsort(values, kind="stable")
    idx = int(np.searchsorted(np.cumsum(alpha[order]), 0.5 - 1e-12))
    return float(values[order[min(idx, len(order) - 1)]])


# ---------------------------------------------------------------- the rule

def smoothed_weiszfeld(gram: np.ndarray, alpha: np.ndarray, nu: float, max_iter: int, tol: float) -> tuple[np.ndarray, int, bool]:
    """Coefficients b (sum 1) of the smoothed weighted geometric median; also iterations and convergence."""
    b = alpha.copy()  # start at the weighted mean, as RFA does
    dist = distances(gram, b)
    norms = np.sqrt(np.maximum(np.diag(gram), 0.0))
    for k in range(1, max_iter + 1):
        beta = alpha / np.maximum(nu, dist)
        new = beta / beta.sum()
        diff = new - b
        step = math.sqrt(max(float(diff @ gram @ diff), 0.0))
        # ||sum_j diff_j u_j|| from G carries an error ~ sqrt(eps) * sum_j |diff_j| ||u_j||: large when huge
        # updates cancel (e.g. +-1e30 outliers inside the starting mean). Count that error as step.
        step += 1e-7 * float(np.abs(diff) @ norms)
        b = new
        dist = distances(gram, b)
        if step <= tol * max(weighted_median(dist, alpha), nu):
            return b, k, True
    return b, max_iter, False


class GeometricMedian:
    """Rule "geometric_median": args ``nu`` (smoothing, > 0, default 1e-6), ``max_iter`` (>= 1, default
    1000), ``tol`` (relative step tolerance, > 0, default 1e-6). ``details`` after aggregate():
    ``{"iterations": k, "converged": bool}``."""

    name = "geometric_median"

    def __init__(self, **args: object) -> None:
        check_args(self.name, args, ("nu", "max_iter", "tol"))
        self.nu = number_arg(args, "nu", 1e-6, low=0.0, low_open=True)
        self.max_iter = int(number_arg(args, "max_iter", 1000, low=1, integer=True))
        self.tol = number_arg(args, "tol", 1e-6, low=0.0, low_open=True)
        self.details: dict = {}

    def min_updates(self) -> int:
        return 1

    def aggregate(self, updates: list[Mapping[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
        names, alpha = check_updates(updates, weights)
        gram, scale = gram_matrix(updates, names)
        coef, iterations, converged = smoothed_weiszfeld(gram, alpha, self.nu * scale, self.max_iter, self.tol)
        self.details = {"iterations": iterations, "converged": converged}
        return combine(updates, names, coef)
