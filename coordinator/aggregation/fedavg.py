"""Weighted federated averaging of updates (McMahan et al. 2017, "Communication-Efficient
Learning of Deep Networks from Decentralized Data", arXiv:1602.05629, Algorithm 1).

The coordinator averages silo deltas weighted by their number of training examples. The sum is
streamed over coordinates in cache-sized float64 chunks, so extra memory is the output plus a few
chunks whatever the number of silos, and each update is read once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from fedsilo.errors import ConfigError


MEAN_CHUNK = 32_768  # elements per float64 accumulator chunk (256 KiB: stays in a core's L2 cache)


def weighted_mean(updates: Iterable[tuple[Mapping[str, np.ndarray], float]]) -> dict[str, np.ndarray]:
    """Sum_i w_i * u_i / Sum_i w_i over (update, weight) pairs, in each tensor's own dtype.

    Streams over coordinates: each chunk of every tensor is accumulated in a float64 buffer that
    stays in cache, then written once in the tensor's dtype; chunks are shared among a few threads
    (numpy releases the GIL in its loops). Extra memory is the output plus two chunks per thread;
    each update is read once.

    >>> a = {"w": np.array([0.0, 2.0], dtype=np.float32)}
    >>> b = {"w": np.array([4.0, 2.0], dtype=np.float32)}
    >>> weighted_mean([(a, 1), (b, 3)])["w"].tolist()
    [3.0, 2.0]
    """
    from coordinator.aggregation import _stack

    pairs = list(updates)
    if not pairs:
        raise ConfigError("no updates to aggregate", fix="check that at least one silo replied with a valid update")
    for _, weight in pairs:
        if not weight > 0:
            raise ConfigError(f"update weight must be positive, got {weight}", fix="send num-examples > 0")
    total = math.fsum(float(w) for _, w in pairs)
    scales = [float(w) / total for _, w in pairs]
    outs: dict[str, np.ndarray] = {}
    tasks: list[tuple[np.ndarray, list[np.ndarray], int, int]] = []
    for name, first in pairs[0][0].items():
        first = np.asarray(first)
        srcs = [_stack.flat(np.asarray(u[name])) for u, _ in pairs]
        out = outs[name] = np.empty(first.size, dtype=first.dtype)
        tasks.extend((out, srcs, start, min(first.size, start + MEAN_CHUNK)) for start in range(0, first.size, MEAN_CHUNK))

    def run(part: list[tuple[np.ndarray, list[np.ndarray], int, int]]) -> None:
        acc = np.empty(MEAN_CHUNK, dtype=np.float64)
        tmp = np.empty(MEAN_CHUNK, dtype=np.float64)
        for out, srcs, start, end in part:
            a, t = acc[: end - start], tmp[: end - start]
            np.multiply(srcs[0][start:end], scales[0], out=a)
            for src, scale in zip(srcs[1:], scales[1:]):
                np.multiply(src[start:end], scale, out=t)
                a += t
            out[start:end] = a  # numpy's cast (non-float tensors truncate, as astype)

    workers = min(_stack.threads(), len(tasks))
    if workers <= 1:
        run(tasks)
    else:
        list(_stack._executor().map(run, [tasks[i::workers] for i in range(workers)]))
    return {name: outs[name].reshape(np.shape(first)) for name, first in pairs[0][0].items()}


class FedAvg:
    """Rule object: ``aggregate(updates, weights)`` -> averaged delta."""

    name = "fedavg"

    def __init__(self, **args: object) -> None:
        if args:
            raise ConfigError(f"plan key 'federation.aggregation.args': fedavg takes no arguments, got {sorted(args)}", fix="remove the args")
        self.details: dict = {}

    def min_updates(self) -> int:
        return 1

    def aggregate(self, updates: list[Mapping[str, np.ndarray]], weights: list[float]) -> dict[str, np.ndarray]:
        return weighted_mean(zip(updates, weights))
