"""Shared machinery of the coordinate-wise and distance-based rules.

Updates arrive as ``n`` mappings of name -> array (silo deltas). Nothing here stacks a whole
``(n, d)`` matrix: every rule walks the coordinates in chunks of ``CHUNK`` elements, copies the
``n`` slices of a chunk into a small per-thread buffer that stays in cache, works on it there and
writes the chunk's result. Extra memory is the output plus a few ``n x CHUNK`` buffers.

Coordinate-wise order statistics use a sorting network (Batcher's odd-even merge sort, pruned to
the outputs a rule needs): for the small ``n`` of cross-silo federations (a handful to a few
dozen silos) a fixed sequence of element-wise ``minimum``/``maximum`` over chunk rows beats a
general sort along a short axis by far, and its result is exactly the sorted values, so medians
and trimmed sums equal numpy's to the last bit of float arithmetic. Chunks are shared among a few
threads (numpy releases the GIL inside the element-wise loops).

Pairwise squared distances (Krum, Multi-Krum, Bulyan) come from one Gram matrix,
``||a - b||^2 = |a|^2 + |b|^2 - 2<a, b>``, accumulated chunk by chunk in float64 (each chunk a
float32 BLAS product of a small buffer) after subtracting a reference update from every update (distances
do not change under a common shift, and the subtraction removes the shared component that would
otherwise cancel badly).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

from fedsilo.errors import ConfigError

CHUNK = 16_384  # elements per chunk row: n rows of float32 stay within a core's L2 cache
GRAM_CHUNK = 65_536  # elements per chunk of the Gram matrix pass (a BLAS product likes longer rows)
MAX_THREADS = 8

Update = Mapping[str, np.ndarray]
# kernel(rows, spare, out): rows are n private 1-D work buffers (the kernel may reorder the list and
# overwrite them), spare one more buffer of the same length, out the chunk of the result.
Kernel = Callable[[list[np.ndarray], np.ndarray, np.ndarray], None]

_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_THREADS))


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=threads(), thread_name_prefix="fedsilo-aggregate")
        return _pool


def check_updates(rule: str, updates: Sequence[Update], weights: Sequence[float] | None, need: int,
                  need_text: str, fix: str) -> list[str]:
    """Refuse too few updates, mismatched weights or names/shapes; return the tensor names in order."""
    n = len(updates)
    if n == 0:
        raise ConfigError("no updates to aggregate", fix="check that at least one silo replied with a valid update")
    if n < need:
        raise ConfigError(f"{rule} needs at least {need} updates ({need_text}), got {n}", fix=fix)
    if weights is not None:
        if len(weights) != n:
            raise ConfigError(f"{rule}: {n} updates but {len(weights)} weights", fix="pass one weight per update")
        for w in weights:
            if not w > 0:
                raise ConfigError(f"update weight must be positive, got {w}", fix="send num-examples > 0")
    keys = list(updates[0].keys())
    for i, u in enumerate(updates[1:], start=1):
        if list(u.keys()) != keys and set(u.keys()) != set(keys):
            raise ConfigError(f"{rule}: update {i} has other tensor names than update 0",
                              fix="validate replies against the global model before aggregating")
        for k in keys:
            if np.shape(u[k]) != np.shape(updates[0][k]):
                raise ConfigError(f"{rule}: tensor '{k}' of update {i} has shape {np.shape(u[k])}, "
                                  f"update 0 has {np.shape(updates[0][k])}",
                                  fix="validate replies against the global model before aggregating")
    return keys


def work_dtype(dtype: np.dtype) -> np.dtype:
    """float32 work for float32 and narrower floats, float64 for float64 and for non-float tensors."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f" and dtype.itemsize <= 4:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def flat(a: np.ndarray) -> np.ndarray:
    """1-D view of an array (a copy only when it is not contiguous)."""
    return np.ascontiguousarray(a).reshape(-1)


def finish(out: np.ndarray, like: np.ndarray) -> np.ndarray:
    """Result in the input tensor's dtype and shape."""
    like = np.asarray(like)
    if out.dtype != like.dtype:
        out = out.astype(like.dtype)
    return out.reshape(like.shape)


def coordinatewise(updates: Sequence[Update], keys: Sequence[str], kernel: Kernel, *,
                   chunk: int = CHUNK) -> dict[str, np.ndarray]:
    """Apply ``kernel`` to every chunk of every tensor; the result keeps each tensor's dtype and shape."""
    n = len(updates)
    tasks: list[tuple[np.ndarray, list[np.ndarray], int, int]] = []
    outs: dict[str, np.ndarray] = {}
    for k in keys:
        first = np.asarray(updates[0][k])
        work = work_dtype(first.dtype)
        srcs = [flat(np.asarray(u[k])) for u in updates]
        out = np.empty(first.size, dtype=work)
        outs[k] = out
        for start in range(0, first.size, chunk):
            tasks.append((out, srcs, start, min(first.size, start + chunk)))

    def run(part: Sequence[tuple[np.ndarray, list[np.ndarray], int, int]]) -> None:
        bufs: dict[np.dtype, np.ndarray] = {}
        for out, srcs, start, end in part:
            m = end - start
            buf = bufs.get(out.dtype)
            if buf is None:
                buf = bufs[out.dtype] = np.empty((n + 1, chunk), dtype=out.dtype)
            rows = [buf[i, :m] for i in range(n)]
            for row, src in zip(rows, srcs):
                row[...] = src[start:end]
            kernel(rows, buf[n, :m], out[start:end])

    workers = min(threads(), len(tasks))
    if workers <= 1:
        run(tasks)
    else:
        list(_executor().map(run, [tasks[t::workers] for t in range(workers)]))
    return {k: finish(outs[k], updates[0][k]) for k in keys}


@lru_cache(maxsize=None)
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd-even merge sort for ``n`` wires: comparators (i, j), i < j, min to i, max to j.

    Built for the next power of two; comparators touching wires >= n are dropped, which is exact
    because those wires would hold +inf and never move.
    """
    p = 1
    while p < n:
        p *= 2
    comps: list[tuple[int, int]] = []

    def merge(lo: int, hi: int, r: int) -> None:
        step = r * 2
        if step < hi - lo:
            merge(lo, hi, step)
            merge(lo + r, hi, step)
            comps.extend((i, i + r) for i in range(lo + r, hi - r, step))
        else:
            comps.append((lo, lo + r))

    def sort(lo: int, hi: int) -> None:
        if hi - lo >= 1:
            mid = lo + (hi - lo) // 2
            sort(lo, mid)
            sort(mid + 1, hi)
            merge(lo, hi, 1)

    sort(0, p - 1)
    return tuple((i, j) for i, j in comps if j < n)


@lru_cache(maxsize=None)
def selection_network(n: int, outputs: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """The sorting network pruned to the comparators that the sorted positions ``outputs`` depend on."""
    need = set(outputs)
    keep: list[tuple[int, int]] = []
    for i, j in reversed(sorting_network(n)):
        if i in need or j in need:
            keep.append((i, j))
            need.update((i, j))
    return tuple(reversed(keep))


def apply_network(rows: list[np.ndarray], spare: np.ndarray, network: Sequence[tuple[int, int]]) -> np.ndarray:
    """Run comparators over the rows in place (by swapping buffers in the list); returns the free buffer."""
    for i, j in network:
        np.minimum(rows[i], rows[j], out=spare)
        np.maximum(rows[i], rows[j], out=rows[j])
        rows[i], spare = spare, rows[i]
    return spare


def squared_distances(updates: Sequence[Update], keys: Sequence[str], *, chunk: int = GRAM_CHUNK) -> np.ndarray:
    """(n, n) float64 matrix of squared L2 distances between the flattened updates, from one Gram matrix.

    The Gram matrix of ``u_i - u_ref`` is accumulated in float64 from per-chunk BLAS products in the
    work dtype (float32 for float32 tensors: a chunk's dot products are rounded once, then summed in
    float64). If a float32 product overflows (updates near 1e19 or beyond), the pass is redone in
    float64, which cannot overflow for finite float32 input. ``ref`` is update 0; if it lies so far from
    the others that cancellation could swamp their mutual distances (an extreme outlier), the pass is
    redone around the update with the lowest sum of distances.
    """
    dist = _distances_around(updates, keys, 0, chunk)
    n = len(updates)
    if n > 2:
        spread = np.median(dist[0, 1:])
        others = dist[1:, 1:][np.triu_indices(n - 1, 1)]
        if spread > 1e6 * max(float(np.median(others)), np.finfo(np.float64).tiny):
            dist = _distances_around(updates, keys, int(np.argmin(dist.sum(axis=1))), chunk)
    return dist


def _distances_around(updates: Sequence[Update], keys: Sequence[str], ref: int, chunk: int) -> np.ndarray:
    gram = _gram_around(updates, keys, ref, chunk, wide=False)
    if not np.all(np.isfinite(gram)):
        gram = _gram_around(updates, keys, ref, chunk, wide=True)
    norms = np.diag(gram)
    dist = norms[:, None] + norms[None, :] - 2.0 * gram
    np.fill_diagonal(dist, 0.0)
    return np.maximum(dist, 0.0)


def _gram_around(updates: Sequence[Update], keys: Sequence[str], ref: int, chunk: int, *, wide: bool) -> np.ndarray:
    n = len(updates)
    gram = np.zeros((n, n), dtype=np.float64)
    bufs: dict[np.dtype, np.ndarray] = {}
    with np.errstate(over="ignore", invalid="ignore"):
        for k in keys:
            srcs = [flat(np.asarray(u[k])) for u in updates]
            work = np.dtype(np.float64) if wide else work_dtype(srcs[0].dtype)
            buf = bufs.get(work)
            if buf is None:
                buf = bufs[work] = np.empty((n, chunk), dtype=work)
            size = srcs[0].size
            for start in range(0, size, chunk):
                end = min(size, start + chunk)
                b = buf[:, : end - start]
                for row, src in zip(b, srcs):
                    row[...] = src[start:end]
                b -= b[ref].copy()
                gram += b @ b.T
    return gram


def krum_scores(dist: np.ndarray, f: int) -> np.ndarray:
    """Krum score of each update: the sum of squared distances to its n - f - 2 nearest other updates."""
    n = dist.shape[0]
    closest = max(1, n - f - 2)
    scores = np.empty(n, dtype=np.float64)
    for i in range(n):
        others = np.delete(dist[i], i)
        scores[i] = np.sort(others)[:closest].sum()
    return scores


def check_f(rule: str, args: dict) -> int:
    f = args.pop("f", 1)
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ConfigError(f"plan key 'federation.aggregation.args.f': {f!r} is not a whole number >= 0",
                          fix=f"set f to the number of Byzantine silos {rule} must tolerate, e.g. 1")
    return f


def refuse_unknown(rule: str, args: dict) -> None:
    if args:
        key = sorted(args)[0]
        raise ConfigError(f"plan key 'federation.aggregation.args.{key}': {rule} has no argument '{key}'",
                          fix=f"remove it")
