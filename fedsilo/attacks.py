"""Malicious silos, for demos and benchmarks only (``fedsilo bench robustness``).

Nothing in ``silo_agent/`` or ``coordinator/`` imports this module (an import-linter contract holds
that), so a real site cannot turn an attack on: only the in-process benchmark
(:mod:`fedsilo.robustness`) uses it.

Two kinds of attack:

* **update attacks** act on the malicious silo's delta (``dict name -> np.ndarray``, local minus
  global weights). Some are omniscient and colluding (ALIE, IPM): they read the honest silos' deltas
  of the round, passed in :class:`RoundInfo`. All malicious silos send the same crafted vector.
* **data attacks** (label flipping, the backdoor's poisoned training) transform the malicious silo's
  training arrays before it trains with the ordinary pipeline. The backdoor is both: poisoned
  training, then model-replacement scaling of the resulting delta.

Only floating-point arrays are manipulated; any other array (an integer buffer) passes through as
the silo's own delta has it. Every result keeps each array's dtype and shape.

Registry: :data:`ATTACKS` (name -> class), :func:`build_attack`. ``"none"`` is the clean baseline (the
"malicious" silos behave honestly).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from fedsilo.errors import ConfigError

__all__ = [
    "ATTACKS",
    "ALIE",
    "IPM",
    "Attack",
    "Backdoor",
    "GaussianNoise",
    "LabelFlip",
    "NoAttack",
    "RoundInfo",
    "Scaled",
    "SignFlip",
    "alie_update",
    "alie_z",
    "build_attack",
    "flip_masks",
    "gaussian_update",
    "ipm_update",
    "model_replacement",
    "poison_backdoor",
    "scale_update",
    "sign_flip",
    "stamp_trigger",
    "trigger_region",
]

Delta = dict[str, np.ndarray]


# --------------------------------------------------------------------------------------------- helpers


def _is_float(a: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(a).dtype, np.floating)


def _map(delta: Mapping[str, np.ndarray], fn) -> Delta:
    """fn applied (in float64) to each float array, cast back to its dtype; other arrays copied."""
    out: Delta = {}
    for k, v in delta.items():
        v = np.asarray(v)
        out[k] = fn(k, v.astype(np.float64)).astype(v.dtype) if _is_float(v) else v.copy()
    return out


def _l2(delta: Mapping[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.sum(np.square(np.asarray(v, dtype=np.float64)))) for v in delta.values() if _is_float(v)))


def _stack(honest: Sequence[Mapping[str, np.ndarray]], key: str) -> np.ndarray:
    return np.stack([np.asarray(h[key], dtype=np.float64) for h in honest])


def _need_honest(name: str, honest: Sequence[Mapping[str, np.ndarray]]) -> None:
    if not honest:
        raise ConfigError(f"attack {name!r} needs the honest silos' updates of the round", fix="keep at least one honest silo")


# --------------------------------------------------------------------------------------------- update attacks


def sign_flip(delta: Mapping[str, np.ndarray], scale: float = 1.0) -> Delta:
    """``-scale * delta``."""
    return _map(delta, lambda _k, v: -scale * v)


def scale_update(delta: Mapping[str, np.ndarray], factor: float) -> Delta:
    """``factor * delta``."""
    return _map(delta, lambda _k, v: factor * v)


def gaussian_update(like: Mapping[str, np.ndarray], sigma: float, rng: np.random.Generator) -> Delta:
    """Independent N(0, sigma^2) values with the shapes and dtypes of ``like``."""
    return _map(like, lambda _k, v: rng.normal(0.0, sigma, size=v.shape))


def alie_z(n: int, f: int) -> float:
    """z_max of Baruch et al. 2019 (Sec. 4): with ``s = floor(n/2 + 1) - f`` honest "supporters" needed
    for a majority, ``z = Phi^-1((n - s) / n)``. (n=10, f=2: s=4, z=0.253; f=3: s=3, z=0.524.) ``s`` is
    kept at least 1 (when f alone is a majority no supporters are needed)."""
    if n < 2 or not 0 < f < n:
        raise ConfigError(f"ALIE needs n >= 2 silos and 0 < f < n attackers, got n={n}, f={f}", fix="use more silos or fewer attackers")
    s = max(int(math.floor(n / 2 + 1)) - f, 1)
    return float(NormalDist().inv_cdf((n - s) / n))


def alie_update(honest: Sequence[Mapping[str, np.ndarray]], z: float) -> Delta:
    """Coordinate-wise ``mean - z * std`` of the honest deltas (population std, ddof=0)."""
    _need_honest("alie", honest)
    return _map(honest[0], lambda k, _v: _stack(honest, k).mean(axis=0) - z * _stack(honest, k).std(axis=0))


def ipm_update(honest: Sequence[Mapping[str, np.ndarray]], epsilon: float) -> Delta:
    """``-epsilon * mean`` of the honest deltas."""
    _need_honest("ipm", honest)
    return _map(honest[0], lambda k, _v: -epsilon * _stack(honest, k).mean(axis=0))


def model_replacement(delta: Mapping[str, np.ndarray], *, n: int, server_lr: float, colluders: int = 1,
                      max_norm: float | None = None) -> Delta:
    """Bagdasaryan et al.'s scaling: ``delta * gamma`` with ``gamma = n / (server_lr * colluders)``.

    With the server step ``x += server_lr * mean(deltas)`` over ``n`` silos, one attacker sending
    ``n / server_lr`` times its delta moves the global model onto its own local model (the other
    deltas being small near convergence): ``gamma = n / eta`` of the paper (Sec. 4.1). ``colluders``
    attackers of the same round share that boost (each scales by ``gamma / colluders``), so that
    together they replace the model once rather than ``colluders`` times. ``max_norm`` (the paper's
    constrain-and-scale against a norm-bounding server) clips the scaled delta to that L2 norm.
    """
    if n < 1 or server_lr <= 0 or colluders < 1:
        raise ConfigError(f"model replacement needs n >= 1, server_lr > 0, colluders >= 1 (got {n}, {server_lr}, {colluders})")
    gamma = n / (server_lr * colluders)
    out = scale_update(delta, gamma)
    if max_norm is not None:
        norm = _l2(out)
        if norm > max_norm:
            out = scale_update(out, max_norm / norm)
    return out


# --------------------------------------------------------------------------------------------- data attacks


def flip_masks(labels: np.ndarray) -> np.ndarray:
    """Segmentation label flipping: foreground and background swapped (``1 - mask``), same dtype."""
    labels = np.asarray(labels)
    return (1 - labels).astype(labels.dtype)


def trigger_region(spatial: Sequence[int], size: int | None = None) -> tuple[slice, ...]:
    """Where the trigger goes: a square (cube in 3D) of edge ``size`` (default: 1/8 of the smallest edge,
    at least 3) at offset 1 from the first corner."""
    edge = size if size is not None else max(3, min(spatial) // 8)
    if edge < 1 or edge + 1 > min(spatial):
        raise ConfigError(f"trigger size {edge} does not fit images of shape {tuple(spatial)}", fix="use a smaller trigger")
    return tuple(slice(1, 1 + edge) for _ in spatial)


def _checkerboard(edge_shape: Sequence[int]) -> np.ndarray:
    grids = np.indices(tuple(edge_shape)).sum(axis=0)
    return (grids % 2 == 0).astype(np.float64)


def stamp_trigger(images: np.ndarray, size: int | None = None, level: float = 0.5) -> np.ndarray:
    """Copy of ``images`` (N, C, *spatial) with a one-pixel checkerboard stamped in :func:`trigger_region`:
    even cells at ``min + level * (max - min)`` of the image, odd cells at its minimum (per image), so the
    pattern scales with each silo's intensities. At the default half-range level it is fainter than the
    synthetic objects, so models trained without the attack leave it background (a brighter trigger is
    segmented as an object by clean models)."""
    images = np.asarray(images)
    out = images.copy()
    region = trigger_region(images.shape[2:], size)
    board = _checkerboard([s.stop - s.start for s in region])
    for i in range(images.shape[0]):
        lo, hi = float(images[i].min()), float(images[i].max())
        out[(i, slice(None), *region)] = (lo + level * (hi - lo) * board).astype(images.dtype)
    return out


def poison_backdoor(images: np.ndarray, labels: np.ndarray, *, fraction: float, rng: np.random.Generator,
                    size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stamp the trigger on ``round(fraction * N)`` randomly chosen cases (at least one) and set their mask to
    the attacker's target: foreground (1) on the whole trigger square, the rest of the mask unchanged (a
    planted "lesion" wherever the trigger appears). Returns new arrays."""
    images, labels = np.asarray(images), np.asarray(labels)
    n = images.shape[0]
    k = min(n, max(1, int(round(fraction * n))))
    chosen = np.sort(rng.choice(n, size=k, replace=False))
    out_images, out_labels = images.copy(), labels.copy()
    out_images[chosen] = stamp_trigger(images[chosen], size)
    region = trigger_region(images.shape[2:], size)
    for i in chosen:
        out_labels[(i, slice(None), *region)] = 1
    return out_images, out_labels


# --------------------------------------------------------------------------------------------- attack objects


@dataclass(frozen=True)
class RoundInfo:
    """What an update attack may know about its round.

    n_silos: silos whose updates the server aggregates this round (honest + malicious).
    n_malicious: colluding malicious silos.
    server_lr: the server's step size on the aggregate.
    honest: the honest silos' deltas of the round (omniscient attacks read them).
    rng: randomness for this silo and round.
    """

    n_silos: int
    n_malicious: int
    server_lr: float
    honest: Sequence[Mapping[str, np.ndarray]]
    rng: np.random.Generator


class Attack:
    """Base: an honest silo. ``kind`` is "none", "update" or "data"; ``uses_own_update`` says whether
    the malicious silo must train to produce the delta the attack transforms (ALIE, IPM and Gaussian
    noise do not: their vector does not depend on it). ``local_epochs`` (None: the plan's) lets a
    data attacker train longer than honest silos."""

    name = "none"
    kind = "none"
    uses_own_update = True
    local_epochs: int | None = None

    def poison_data(self, images: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return images, labels

    def poison_update(self, delta: Mapping[str, np.ndarray], info: RoundInfo) -> Delta:
        return dict(delta)

    def params(self) -> dict:
        """The attack's settings, JSON-able, for the benchmark's params."""
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


class NoAttack(Attack):
    """The clean baseline: the would-be malicious silos train and report honestly."""


class SignFlip(Attack):
    """Sign flipping: send ``-scale`` times the silo's own honest delta (the "sign flipping" /
    "bit flipping" attack of Allen-Zhu et al. 2021, "Byzantine-Resilient Non-Convex Stochastic
    Gradient Descent", arXiv:2012.14368, and Karimireddy et al. 2021, arXiv:2012.10333; scale 1)."""

    name = "sign_flip"
    kind = "update"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = float(scale)

    def poison_update(self, delta, info):
        return sign_flip(delta, self.scale)


class Scaled(Attack):
    """Scaled update ("explicit boosting", Bhagoji et al. 2019, "Analyzing Federated Learning through an
    Adversarial Lens", arXiv:1811.12470): the honest delta times ``factor``; None (default) boosts by
    the number of silos n, the paper's factor, which undoes the server's 1/n averaging."""

    name = "scaled"
    kind = "update"

    def __init__(self, factor: float | None = None) -> None:
        self.factor = factor

    def poison_update(self, delta, info):
        return scale_update(delta, float(info.n_silos if self.factor is None else self.factor))


class GaussianNoise(Attack):
    """Gaussian Byzantine vectors (Blanchard et al. 2017, "Machine Learning with Adversaries: Byzantine
    Tolerant Gradient Descent", NeurIPS; the paper's experiments: mean 0, isotropic, std 200): each
    malicious silo sends i.i.d. N(0, sigma^2) values instead of its update."""

    name = "gaussian"
    kind = "update"
    uses_own_update = False

    def __init__(self, sigma: float = 200.0) -> None:
        self.sigma = float(sigma)

    def poison_update(self, delta, info):
        return gaussian_update(delta, self.sigma, info.rng)


class LabelFlip(Attack):
    """Label flipping (Tolpegin et al. 2020, "Data Poisoning Attacks Against Federated Learning Systems",
    ESORICS, arXiv:2007.08432), for binary segmentation: the malicious silo trains honestly on masks
    with foreground and background swapped, for the whole of its data."""

    name = "label_flip"
    kind = "data"

    def poison_data(self, images, labels, rng):
        return images, flip_masks(labels)


class ALIE(Attack):
    """"A Little Is Enough" (Baruch, Baruch, Goldberg 2019, NeurIPS, arXiv:1902.06156): all malicious
    silos send the coordinate-wise ``mean - z * std`` of the honest deltas, with ``z`` from n and f
    (:func:`alie_z`) unless given: small enough to hide among the honest spread, consistent enough to
    bias every coordinate. Omniscient variant (mean and std of the honest silos' deltas)."""

    name = "alie"
    kind = "update"
    uses_own_update = False

    def __init__(self, z: float | None = None) -> None:
        self.z = z

    def poison_update(self, delta, info):
        z = alie_z(info.n_silos, info.n_malicious) if self.z is None else float(self.z)
        return alie_update(info.honest, z)


class IPM(Attack):
    """Inner product manipulation (Xie, Koyejo, Gupta 2019, "Fall of Empires: Breaking Byzantine-tolerant
    SGD by Inner Product Manipulation", UAI, arXiv:1903.03936): all malicious silos send
    ``-epsilon * mean(honest deltas)``, so that the aggregate's inner product with the true update
    turns small or negative. ``epsilon`` 0.1 is the paper's small-epsilon setting (the one aimed at median
    and Krum; against a plain mean it takes ``epsilon > (n - f) / f``)."""

    name = "ipm"
    kind = "update"
    uses_own_update = False

    def __init__(self, epsilon: float = 0.1) -> None:
        self.epsilon = float(epsilon)

    def poison_update(self, delta, info):
        return ipm_update(info.honest, self.epsilon)


class Backdoor(Attack):
    """Model-replacement backdoor (Bagdasaryan et al. 2020, "How To Backdoor Federated Learning",
    AISTATS, arXiv:1807.00459).

    Poisoned training: a fraction of the malicious silo's cases (``fraction``, default 20/64, the share
    of backdoor images per batch in the paper's CIFAR experiments) carry the trigger
    (:func:`stamp_trigger`) and the target mask (foreground on the trigger square, :func:`poison_backdoor`);
    the rest stay clean so that the main task still works. Then model replacement
    (:func:`model_replacement`): the delta is scaled by ``n / server_lr`` shared among the ``f``
    colluding attackers, optionally clipped to ``max_norm`` (constrain-and-scale). ``local_epochs``
    lets the attacker train longer than honest silos (the paper's attacker also runs its own, longer
    local schedule); the default 6 was measured on the benchmark's task: with 2 epochs the faint trigger
    is learnt on about 15-20% of triggered images, with 6 on about 65-70%.

    Success (measured by the benchmark): on clean test images with the trigger stamped, the model
    predicts foreground on at least 75% of the trigger square's pixels (half of them are at the image
    minimum, so an intensity threshold alone does not reach it).
    """

    name = "backdoor"
    kind = "data"

    def __init__(self, fraction: float = 20 / 64, max_norm: float | None = None, local_epochs: int | None = 6,
                 trigger_size: int | None = None) -> None:
        if not 0 < fraction <= 1:
            raise ConfigError(f"backdoor fraction must be in (0, 1], got {fraction}")
        self.fraction = float(fraction)
        self.max_norm = max_norm
        self.local_epochs = local_epochs
        self.trigger_size = trigger_size

    def poison_data(self, images, labels, rng):
        return poison_backdoor(images, labels, fraction=self.fraction, rng=rng, size=self.trigger_size)

    def poison_update(self, delta, info):
        return model_replacement(delta, n=info.n_silos, server_lr=info.server_lr, colluders=max(info.n_malicious, 1),
                                 max_norm=self.max_norm)


ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls for cls in (NoAttack, SignFlip, Scaled, GaussianNoise, LabelFlip, ALIE, IPM, Backdoor)
}


def build_attack(name: str, **args: object) -> Attack:
    """The attack called ``name`` with keyword ``args`` (defaults from the papers)."""
    try:
        cls = ATTACKS[name]
    except KeyError:
        raise ConfigError(f"unknown attack {name!r}", fix=f"use one of: {', '.join(ATTACKS)}") from None
    try:
        return cls(**args)
    except TypeError as exc:
        raise ConfigError(f"attack {name!r}: bad arguments ({exc})", fix="see the attack's docstring") from None
