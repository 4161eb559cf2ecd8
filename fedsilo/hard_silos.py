"""Hard non-IID synthetic silos for ``fedsilo bench utility``: 2D segmentation, in memory.

:func:`pipelines.synthetic.default_profiles` makes silos that differ mildly (a global threshold already
segments them well: MONAI's discs have intensity 0.5..1 over noise below 0.5). To make the gaps between
pooled, federated and local-only training mean something, each silo here differs from the others in
several ways at once, and every image carries things a threshold cannot separate from the target:

- scanner: ``image = offset + scale * x`` with a per-silo offset and scale (no normalisation: what a
  global threshold sees differs per silo);
- contrast: the objects' intensity over the background (per silo);
- noise: additive Gaussian, per-silo standard deviation, comparable to the contrast;
- bias field: a smooth multiplicative ramp in a random direction per image (coil/beam inhomogeneity),
  per-silo strength;
- object size: per-silo radius range (at 32 px: from 3..5 to 6..9 px);
- distractors: small bright blobs (radius 1..2 px) as bright as the objects but not labelled (vessels,
  calcifications): only their size tells them apart;
- size: few training cases at small silos (local-only training there is data-starved).

Images come from :func:`monai.data.synthetic.create_test_image_2d` (the discs and their masks, noise-free),
then the above is applied with a ``numpy.random.RandomState`` seeded per (silo seed, case index), so the same
profile always gives the same pixels. 2D keeps the benchmark's many trainings to minutes on 2 cores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedsilo.errors import ConfigError

#: Offset into the case index for test cases: train and test never share a seed.
TEST_INDEX_BASE = 1_000_000


@dataclass(frozen=True)
class HardSiloProfile:
    """One synthetic hospital (see the module docstring for what each knob means).

    Attributes:
        name: e.g. "silo0".
        n_train / n_test: training and held-out cases.
        scale / offset: scanner intensity mapping ``offset + scale * x``.
        contrast: object intensity over background before the scanner mapping (0 < contrast <= 1).
        noise: standard deviation of the additive Gaussian noise, before the scanner mapping.
        bias: strength of the multiplicative ramp (0: none; 0.4: intensity varies +-40% across the image).
        radius: (min, max) object radius in pixels at 32 px (scaled with the image size).
        num_objects: labelled objects per image.
        distractors: unlabelled small bright blobs per image.
        seed: base seed of the silo.
    """

    name: str
    n_train: int
    n_test: int
    scale: float
    offset: float
    contrast: float
    noise: float
    bias: float
    radius: tuple[int, int]
    num_objects: int
    distractors: int
    seed: int


def _pick(values: Sequence, i: int):
    return values[i % len(values)]


def hard_profiles(n_silos: int = 5, *, seed: int = 0, train_sizes: Sequence[int] | None = None,
                  n_test: int = 40) -> list[HardSiloProfile]:
    """``n_silos`` profiles: sizes from small to large, each other knob rotated so silos differ in several ways.

    Default training sizes: 16, 32, 64, 128, 256 (cycled and doubled beyond 5 silos). The smallest silo gets
    the lowest contrast and the strongest noise, so that local-only training is hardest where data is fewest,
    as at a small hospital with an old scanner.
    """
    if isinstance(n_silos, bool) or not isinstance(n_silos, int) or n_silos < 2:
        raise ConfigError(f"silos must be a whole number >= 2, got {n_silos!r}", fix="use --silos 2 or more")
    if train_sizes is None:
        train_sizes = [16 * 2 ** (i % 5) * (1 + i // 5) for i in range(n_silos)]
    train_sizes = list(train_sizes)
    if len(train_sizes) != n_silos or any(not isinstance(n, int) or n < 2 for n in train_sizes):
        raise ConfigError(f"training sizes {train_sizes} must be {n_silos} whole numbers >= 2",
                          fix="give one size per silo, e.g. 16,32,64,128,256")
    if isinstance(n_test, bool) or not isinstance(n_test, int) or n_test < 1:
        raise ConfigError(f"test cases per silo must be >= 1, got {n_test!r}", fix="use e.g. 40")
    # Knob values, from the hardest (index 0) on; silo i takes entry (i * step) so that knobs do not move together.
    scales = (0.6, 1.8, 1.0, 2.5, 0.8)
    offsets = (0.5, -0.3, 0.0, 0.9, 0.25)
    contrasts = (0.45, 0.55, 0.65, 0.8, 1.0)
    noises = (0.22, 0.18, 0.15, 0.12, 0.1)
    biases = (0.4, 0.2, 0.35, 0.1, 0.25)
    radii = ((3, 5), (6, 9), (4, 7), (5, 8), (3, 6))
    objects = (2, 3, 2, 4, 3)
    distractors = (6, 4, 8, 5, 3)
    out = []
    for i in range(n_silos):
        s = int(np.random.SeedSequence([int(seed), i, 0x4A2D]).generate_state(1)[0])
        out.append(HardSiloProfile(
            name=f"silo{i}", n_train=int(train_sizes[i]), n_test=n_test,
            scale=_pick(scales, i), offset=_pick(offsets, i), contrast=_pick(contrasts, i), noise=_pick(noises, i),
            bias=_pick(biases, 2 * i), radius=_pick(radii, i), num_objects=_pick(objects, 3 * i),
            distractors=_pick(distractors, i), seed=s,
        ))
    return out


def _case(profile: HardSiloProfile, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    from monai.data.synthetic import create_test_image_2d

    rs = np.random.RandomState([profile.seed & 0xFFFFFFFF, index & 0xFFFFFFFF, 0x51])
    factor = size / 32
    rad_min = max(1, int(round(profile.radius[0] * factor)))
    rad_max = max(rad_min + 1, int(round(profile.radius[1] * factor)))
    rad_max = min(rad_max, (size - 1) // 2)
    base, labels = create_test_image_2d(size, size, num_objs=profile.num_objects, rad_max=rad_max, rad_min=rad_min,
                                        noise_max=0.0, num_seg_classes=1, random_state=rs)
    mask = labels > 0
    image = base.astype(np.float64)
    if profile.distractors:
        d_max = max(2, int(round(3 * factor)))
        blobs, _ = create_test_image_2d(size, size, num_objs=profile.distractors, rad_max=d_max, rad_min=1,
                                        noise_max=0.0, num_seg_classes=1, random_state=rs)
        blobs = blobs * rs.uniform(0.6, 1.0)
        image = np.where(mask, image, np.maximum(image, blobs))
    image = profile.contrast * image
    yy, xx = np.mgrid[-1:1:size * 1j, -1:1:size * 1j]
    angle = rs.uniform(0, 2 * np.pi)
    ramp = np.cos(angle) * xx + np.sin(angle) * yy
    image = image * (1.0 + profile.bias * ramp)
    image = image + rs.normal(0.0, profile.noise, size=image.shape)
    image = profile.offset + profile.scale * image
    return image.astype(np.float32), mask.astype(np.float32)


def silo_cases(profile: HardSiloProfile, *, split: str, size: int = 32):
    """The silo's ``split`` ("train" or "test") as :class:`pipelines.dataset.CaseArrays` (N, 1, size, size)."""
    from pipelines.dataset import CaseArrays

    if split not in ("train", "test"):
        raise ConfigError(f"split {split!r} is not known", fix="use train or test")
    if size < 16:
        raise ConfigError(f"image size {size} is too small", fix="use 16 or more")
    count, start = (profile.n_train, 0) if split == "train" else (profile.n_test, TEST_INDEX_BASE)
    pairs = [_case(profile, start + i, size) for i in range(count)]
    return CaseArrays(np.stack([p[0] for p in pairs])[:, None], np.stack([p[1] for p in pairs])[:, None])


def best_threshold(images: np.ndarray, masks: np.ndarray, *, candidates: int = 64) -> float:
    """The global intensity threshold with the highest mean per-image Dice on (images, masks).

    Candidates: ``candidates`` quantiles of the pixel values between the 50th and 99.9th percentile.
    """
    values = np.quantile(images, np.linspace(0.5, 0.999, candidates))
    scores = [float(np.mean(threshold_dice(images, masks, t))) for t in values]
    return float(values[int(np.argmax(scores))])


def threshold_dice(images: np.ndarray, masks: np.ndarray, threshold: float) -> np.ndarray:
    """Per-image Dice of ``images > threshold`` against ``masks`` (1 where both are empty, as pipelines.metrics)."""
    pred = (images > threshold).reshape(len(images), -1)
    true = masks.reshape(len(masks), -1) > 0.5
    inter = np.sum(pred & true, axis=1)
    total = np.sum(pred, axis=1) + np.sum(true, axis=1)
    return np.where(total == 0, 1.0, 2.0 * inter / np.maximum(total, 1))


__all__ = ["HardSiloProfile", "best_threshold", "hard_profiles", "silo_cases", "threshold_dice"]
