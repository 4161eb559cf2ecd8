"""Server optimizers: how the aggregated delta moves the global model (``federation.server_optimizer``).

``sgd``: x <- x + lr * delta (FedAvg with a server learning rate).
``adam`` / ``yogi``: the adaptive server optimizers FedAdam / FedYogi of Reddi et al. 2021, "Adaptive
Federated Optimization" (ICLR; arXiv:2003.00295, Algorithm 2), with the pseudo-gradient delta
(the aggregate of the silos' local - global). Semantics follow Flower 1.42's
``flwr.serverapp.strategy.FedAdam`` / ``FedYogi`` exactly, so that a plan gives the same model as
those strategies given the same aggregated delta:

    m <- beta1 * m + (1 - beta1) * delta                         (m starts at 0)
    adam: v <- beta2 * v + (1 - beta2) * delta^2                  (v starts at 0)
    yogi: v <- v - (1 - beta2) * delta^2 * sign(v - delta^2)      (v starts at 0, not tau^2 as in the paper)
    adam: x <- x + lr * sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1)) * m / (sqrt(v) + tau)
    yogi: x <- x + lr * m / (sqrt(v) + tau)                        (no bias correction)

t is this optimizer's step count starting at 1 (Flower's ``server_round``), so Adam's bias
correction uses exponent t + 1, as Flower does (the paper has no bias correction; Kingma & Ba's
exponent would be t). Mapping to Flower: lr = ``eta`` (the plan's ``federation.server_lr``; Flower's
default is 0.1 for FedAdam and 0.01 for FedYogi, ours is the plan's, 1.0 unless set), beta1 =
``beta_1`` (0.9), beta2 = ``beta_2`` (0.99), tau = ``tau`` (1e-3, the adaptivity epsilon); Flower's
``eta_l`` (client learning rate) has no effect on its update and no counterpart here.

Moments are kept in float32 for float16/float32 tensors and float64 for float64 tensors (as
Flower's, which are ``zeros_like`` the arrays). Non-floating tensors (counters) are not optimised:
every optimizer applies x + round(lr * delta) to them. ``step`` returns a new state in each
tensor's own dtype and leaves its inputs untouched. ``state_dict`` is arrays only ("step", "m/NAME",
"v/NAME") for checkpoint and resume.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from fedsilo.errors import ConfigError

_PREFIX = "federation.server_optimizer"


def _number(args: Mapping[str, object], key: str, default: float, *, low: float, low_open: bool, high: float = math.inf) -> float:
    """``args[key]`` or ``default``, checked to lie in (low or [low) .. high) (high always open)."""
    if key not in args:
        return default
    value = args[key]
    where = f"plan key '{_PREFIX}.args.{key}'"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: {value!r} is not a number", fix="use a number")
    value = float(value)
    if not math.isfinite(value) or value < low or (low_open and value == low) or value >= high:
        bound = (f"> {low:g}" if low_open else f">= {low:g}") + ("" if high == math.inf else f" and < {high:g}")
        raise ConfigError(f"{where}: {value!r} is out of range", fix=f"use a value {bound}")
    return value


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating)


def _moment_dtype(dtype: np.dtype) -> np.dtype:
    return np.result_type(dtype, np.float32)


def _check_match(global_state: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> None:
    if set(global_state) != set(delta) or any(np.shape(delta[k]) != np.shape(v) for k, v in global_state.items()):
        raise ConfigError("server optimizer: the aggregated delta does not have the global model's tensor names and shapes",
                          fix="aggregate updates validated against the global model")


def _sgd_one(x: np.ndarray, d: np.ndarray, lr: float) -> np.ndarray:
    new = x + lr * np.asarray(d, dtype=np.float64)
    if not _is_float(x.dtype):
        new = np.rint(new)
    return new.astype(x.dtype)


class ServerOptimizer:
    """Base class; ``build_server_optimizer`` picks the subclass."""

    name = "sgd"

    def __init__(self, lr: float) -> None:
        self.lr = lr

    def step(self, global_state: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        _check_match(global_state, delta)
        return {k: _sgd_one(np.asarray(x), delta[k], self.lr) for k, x in global_state.items()}

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if state:
            raise ConfigError(f"server optimizer '{self.name}' keeps no state, but the checkpoint holds {len(state)} arrays",
                              fix="resume with the plan that wrote the checkpoint")


class SGD(ServerOptimizer):
    name = "sgd"


class _Adaptive(ServerOptimizer):
    def __init__(self, lr: float, beta1: float, beta2: float, tau: float) -> None:
        super().__init__(lr)
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self.t = 0
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def _second_moment(self, v: np.ndarray, d: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _lr_t(self) -> float | np.float64:
        return self.lr

    def step(self, global_state: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        _check_match(global_state, delta)
        if self.m and set(self.m) != {k for k, x in global_state.items() if _is_float(np.asarray(x).dtype)}:
            raise ConfigError("server optimizer state does not match the global model's tensors",
                              fix="resume from a checkpoint of the same plan")
        self.t += 1
        lr_t = self._lr_t()
        out: dict[str, np.ndarray] = {}
        for k, x in global_state.items():
            x = np.asarray(x)
            if not _is_float(x.dtype):
                out[k] = _sgd_one(x, delta[k], self.lr)
                continue
            dt = _moment_dtype(x.dtype)
            d = np.asarray(delta[k]).astype(dt, copy=False)
            m = self.m.get(k)
            v = self.v.get(k)
            if m is None:
                m, v = np.zeros(x.shape, dt), np.zeros(x.shape, dt)
            m = self.beta1 * m + (1 - self.beta1) * d
            v = self._second_moment(v, d)
            self.m[k], self.v[k] = m, v
            # Flower's expression and operand order (adam: lr_t is an np.float64, so this runs in float64).
            new = x + lr_t * m / (np.sqrt(v) + self.tau)
            out[k] = new.astype(x.dtype)
        return out

    def state_dict(self) -> dict[str, np.ndarray]:
        state = {"step": np.array(self.t, dtype=np.int64)}
        state.update({f"m/{k}": v.copy() for k, v in self.m.items()})
        state.update({f"v/{k}": v.copy() for k, v in self.v.items()})
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        if "step" not in state or any(not (k == "step" or k.startswith(("m/", "v/"))) for k in state):
            raise ConfigError(f"checkpointed state of server optimizer '{self.name}' is malformed (keys: {sorted(state)[:5]})",
                              fix="resume with the plan that wrote the checkpoint")
        m = {k[2:]: np.array(v) for k, v in state.items() if k.startswith("m/")}
        v = {k[2:]: np.array(a) for k, a in state.items() if k.startswith("v/")}
        if set(m) != set(v):
            raise ConfigError(f"checkpointed state of server optimizer '{self.name}' has first and second moments for different tensors",
                              fix="resume from an intact checkpoint")
        self.t, self.m, self.v = int(state["step"]), m, v


class Adam(_Adaptive):
    name = "adam"

    def _second_moment(self, v: np.ndarray, d: np.ndarray) -> np.ndarray:
        return self.beta2 * v + (1 - self.beta2) * (d**2)

    def _lr_t(self) -> np.float64:
        # Flower's FedAdam: eta * sqrt(1 - beta2^(round+1)) / (1 - beta1^(round+1)), rounds from 1.
        return self.lr * np.sqrt(1 - np.power(self.beta2, self.t + 1.0)) / (1 - np.power(self.beta1, self.t + 1.0))


class Yogi(_Adaptive):
    name = "yogi"

    def _second_moment(self, v: np.ndarray, d: np.ndarray) -> np.ndarray:
        d2 = d**2
        return v - (1.0 - self.beta2) * d2 * np.sign(v - d2)


OPTIMIZERS = {"sgd": SGD, "adam": Adam, "yogi": Yogi}


def build_server_optimizer(name: str, lr: float, args: Mapping[str, object] | None = None) -> ServerOptimizer:
    """The plan's server optimizer; ConfigError naming the plan key on a bad name, lr or argument."""
    args = dict(args or {})
    if name not in OPTIMIZERS:
        raise ConfigError(f"plan key '{_PREFIX}.name': unknown server optimizer '{name}'", fix=f"use one of: {', '.join(OPTIMIZERS)}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or not lr > 0:
        raise ConfigError(f"plan key 'federation.server_lr': {lr!r} is out of range", fix="use a number > 0")
    allowed = () if name == "sgd" else ("beta1", "beta2", "tau")
    unknown = sorted(set(args) - set(allowed))
    if unknown:
        raise ConfigError(f"plan key '{_PREFIX}.args.{unknown[0]}': unknown argument for server optimizer '{name}'",
                          fix=f"use only: {', '.join(allowed)}" if allowed else "remove the args")
    if name == "sgd":
        return SGD(float(lr))
    beta1 = _number(args, "beta1", 0.9, low=0.0, low_open=False, high=1.0)
    beta2 = _number(args, "beta2", 0.99, low=0.0, low_open=False, high=1.0)
    tau = _number(args, "tau", 1e-3, low=0.0, low_open=True)
    return OPTIMIZERS[name](float(lr), beta1, beta2, tau)
