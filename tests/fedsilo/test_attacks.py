"""Each attack of fedsilo.attacks does what its paper says, on known inputs."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedsilo.attacks import (
    ATTACKS,
    ALIE,
    IPM,
    Backdoor,
    GaussianNoise,
    LabelFlip,
    NoAttack,
    RoundInfo,
    Scaled,
    SignFlip,
    alie_update,
    alie_z,
    build_attack,
    flip_masks,
    gaussian_update,
    ipm_update,
    model_replacement,
    poison_backdoor,
    scale_update,
    sign_flip,
    stamp_trigger,
    trigger_region,
)
from fedsilo.errors import ConfigError


def delta(a, b=(1.0, -2.0)):
    return {"w": np.array(a, dtype=np.float32), "b": np.array(b, dtype=np.float64), "steps": np.array([3], dtype=np.int64)}


HONEST = [delta([1.0, 2.0, 3.0], [0.0, 1.0]), delta([3.0, 2.0, 1.0], [2.0, 1.0]), delta([2.0, 5.0, 2.0], [4.0, 1.0])]


def info(n=5, f=2, honest=HONEST, server_lr=1.0, seed=0):
    return RoundInfo(n_silos=n, n_malicious=f, server_lr=server_lr, honest=honest, rng=np.random.default_rng(seed))


def test_registry_names_every_attack_and_builds_with_paper_defaults():
    assert set(ATTACKS) == {"none", "sign_flip", "scaled", "gaussian", "label_flip", "alie", "ipm", "backdoor"}
    assert isinstance(build_attack("none"), NoAttack)
    assert build_attack("gaussian").sigma == 200.0  # Blanchard et al. 2017
    assert build_attack("ipm").epsilon == 0.1  # Xie et al. 2019
    assert build_attack("backdoor").fraction == pytest.approx(20 / 64)  # Bagdasaryan et al. 2020
    assert build_attack("ipm", epsilon=0.5).epsilon == 0.5
    with pytest.raises(ConfigError, match="unknown attack"):
        build_attack("bitflip")
    with pytest.raises(ConfigError, match="bad arguments"):
        build_attack("ipm", eps=1)


def test_sign_flip_negates_and_keeps_dtypes_and_integer_arrays():
    d = delta([1.0, -2.5, 0.0])
    out = sign_flip(d)
    np.testing.assert_array_equal(out["w"], [-1.0, 2.5, 0.0])
    np.testing.assert_array_equal(out["b"], [-1.0, 2.0])
    assert out["w"].dtype == np.float32 and out["b"].dtype == np.float64
    np.testing.assert_array_equal(out["steps"], [3])  # not a weight: passed through
    np.testing.assert_array_equal(sign_flip(d, scale=4.0)["w"], [-4.0, 10.0, 0.0])
    np.testing.assert_array_equal(SignFlip().poison_update(d, info())["w"], [-1.0, 2.5, 0.0])
    np.testing.assert_array_equal(d["w"], [1.0, -2.5, 0.0])  # input untouched


def test_scaled_scales_by_factor_and_by_n_by_default():
    d = delta([1.0, -2.0, 0.5])
    np.testing.assert_allclose(scale_update(d, 3.0)["w"], [3.0, -6.0, 1.5])
    np.testing.assert_allclose(Scaled().poison_update(d, info(n=10))["w"], [10.0, -20.0, 5.0])
    np.testing.assert_allclose(Scaled(factor=-2).poison_update(d, info(n=10))["b"], [-2.0, 4.0])


def test_gaussian_noise_has_the_shapes_dtypes_and_spread_asked_for():
    like = {"w": np.zeros((200, 100), dtype=np.float32), "steps": np.array([3])}
    out = gaussian_update(like, 200.0, np.random.default_rng(1))
    assert out["w"].shape == (200, 100) and out["w"].dtype == np.float32
    assert out["w"].std() == pytest.approx(200.0, rel=0.03)
    assert abs(out["w"].mean()) < 200.0 * 4 / math.sqrt(out["w"].size)
    again = gaussian_update(like, 200.0, np.random.default_rng(1))
    np.testing.assert_array_equal(out["w"], again["w"])
    attacked = GaussianNoise(sigma=1.0).poison_update(like, info(seed=3))
    assert attacked["w"].std() == pytest.approx(1.0, rel=0.03)


def test_alie_z_follows_the_paper_from_n_and_f():
    # s = floor(n/2 + 1) - f supporters; z = Phi^-1((n - s) / n)
    assert alie_z(10, 2) == pytest.approx(0.253347, abs=1e-5)  # s = 4, Phi^-1(0.6)
    assert alie_z(10, 3) == pytest.approx(0.524401, abs=1e-5)  # s = 3, Phi^-1(0.7)
    assert alie_z(50, 24) == pytest.approx(1.750686, abs=1e-5)  # the paper's n=50, m=24: s = 2, Phi^-1(0.96)
    with pytest.raises(ConfigError):
        alie_z(10, 0)


def test_alie_sends_mean_minus_z_std_coordinatewise():
    out = alie_update(HONEST, 1.5)
    w = np.stack([h["w"] for h in HONEST]).astype(np.float64)
    np.testing.assert_allclose(out["w"], w.mean(0) - 1.5 * w.std(0), rtol=1e-6)
    np.testing.assert_allclose(out["b"], [2.0 - 1.5 * math.sqrt(8 / 3), 1.0])  # second coordinate: no spread
    assert out["w"].dtype == np.float32
    z = alie_z(5, 2)
    np.testing.assert_allclose(ALIE().poison_update(delta([9.0, 9.0, 9.0]), info(n=5, f=2))["w"],
                               w.mean(0) - z * w.std(0), rtol=1e-6)  # its own update is ignored
    with pytest.raises(ConfigError):
        alie_update([], 1.0)


def test_ipm_sends_minus_epsilon_times_the_honest_mean():
    out = ipm_update(HONEST, 0.5)
    np.testing.assert_allclose(out["w"], [-1.0, -1.5, -1.0])
    np.testing.assert_allclose(out["b"], [-1.0, -0.5])
    np.testing.assert_allclose(IPM().poison_update(delta([9.0, 9.0, 9.0]), info())["w"], [-0.2, -0.3, -0.2], rtol=1e-6)


@settings(max_examples=30, deadline=None)
@given(arrays(np.float64, (4, 3), elements=st.floats(-1e3, 1e3)), st.floats(0.0, 3.0))
def test_alie_stays_within_the_honest_spread_and_ipm_opposes_the_mean(rows, z):
    honest = [{"w": r} for r in rows]
    mean, std = rows.mean(0), rows.std(0)
    out = alie_update(honest, z)["w"]
    assert np.all(out <= mean + 1e-9 * (1 + abs(mean))) and np.all(out >= mean - z * std - 1e-6 * (1 + abs(mean) + std))
    ipm = ipm_update(honest, 0.1)["w"]
    assert float(ipm @ mean) <= 1e-9


def test_label_flip_swaps_foreground_and_background():
    labels = np.array([[[[0.0, 1.0], [1.0, 0.0]]]], dtype=np.float32)
    images = np.ones_like(labels)
    out_images, out_labels = LabelFlip().poison_data(images, labels, np.random.default_rng(0))
    np.testing.assert_array_equal(out_labels, [[[[1.0, 0.0], [0.0, 1.0]]]])
    assert out_labels.dtype == np.float32 and out_images is images
    np.testing.assert_array_equal(flip_masks(flip_masks(labels)), labels)


def test_trigger_stamps_a_checkerboard_in_the_corner_and_nothing_else():
    rng = np.random.default_rng(0)
    images = (rng.random((3, 1, 32, 32)) * np.array([1.0, 2.0, 0.5])[:, None, None, None]).astype(np.float32)
    out = stamp_trigger(images)
    region = trigger_region((32, 32))
    assert region == (slice(1, 5), slice(1, 5))  # edge 32 // 8 = 4, one pixel in from the corner
    for i in range(3):
        lo, hi = images[i].min(), images[i].max()
        patch = out[i, 0, 1:5, 1:5]
        np.testing.assert_allclose(patch[0, 0], lo + 0.5 * (hi - lo), rtol=1e-6)
        np.testing.assert_allclose(patch[0, 1], lo)
        np.testing.assert_allclose(patch, patch.T)  # a checkerboard is symmetric
        assert len(np.unique(patch)) == 2
    outside = np.ones((32, 32), bool)
    outside[1:5, 1:5] = False
    np.testing.assert_array_equal(out[:, :, outside], images[:, :, outside])
    assert out.dtype == np.float32


def test_backdoor_poisons_a_fraction_with_trigger_and_target_label():
    rng = np.random.default_rng(0)
    images = rng.random((16, 1, 16, 16)).astype(np.float32)
    labels = (rng.random((16, 1, 16, 16)) > 0.8).astype(np.float32)
    out_images, out_labels = poison_backdoor(images, labels, fraction=0.25, rng=np.random.default_rng(5))
    changed = [i for i in range(16) if not np.array_equal(out_images[i], images[i])]
    assert len(changed) == 4  # round(0.25 * 16)
    region = (slice(None), *trigger_region((16, 16)))  # edge max(3, 16 // 8) = 3
    for i in range(16):
        if i in changed:
            assert np.all(out_labels[i][region] == 1)  # target: the trigger square is "lesion"
            np.testing.assert_array_equal(out_images[i], stamp_trigger(images[i:i + 1])[0])
            rest = np.ones((1, 16, 16), bool)
            rest[region] = False
            np.testing.assert_array_equal(out_labels[i][rest], labels[i][rest])
        else:
            np.testing.assert_array_equal(out_labels[i], labels[i])
    # the attack object does the same with its fraction
    b_images, _ = Backdoor(fraction=0.5).poison_data(images, labels, np.random.default_rng(5))
    assert sum(not np.array_equal(b_images[i], images[i]) for i in range(16)) == 8


def test_model_replacement_scales_by_n_over_server_lr_shared_by_colluders():
    d = {"w": np.array([3.0, 4.0], dtype=np.float32)}
    np.testing.assert_allclose(model_replacement(d, n=10, server_lr=1.0)["w"], [30.0, 40.0])
    np.testing.assert_allclose(model_replacement(d, n=10, server_lr=0.5)["w"], [60.0, 80.0])
    np.testing.assert_allclose(model_replacement(d, n=10, server_lr=1.0, colluders=2)["w"], [15.0, 20.0])
    clipped = model_replacement(d, n=10, server_lr=1.0, max_norm=5.0)["w"]  # constrain-and-scale
    np.testing.assert_allclose(clipped, [3.0, 4.0], rtol=1e-6)
    np.testing.assert_allclose(Backdoor().poison_update(d, info(n=10, f=2, server_lr=1.0))["w"], [15.0, 20.0])
    # the replacement property: with the others sending zero, fedavg + server step lands on the attacker's model
    n, eta = 10, 0.5
    sent = model_replacement(d, n=n, server_lr=eta)["w"]
    np.testing.assert_allclose(eta * sent / n, d["w"], rtol=1e-6)


def test_attack_kinds_say_what_the_harness_must_do():
    assert NoAttack().kind == "none"
    assert {a.kind for a in (SignFlip(), Scaled(), GaussianNoise(), ALIE(), IPM())} == {"update"}
    assert LabelFlip().kind == "data" and Backdoor().kind == "data"
    assert not ALIE().uses_own_update and not IPM().uses_own_update and not GaussianNoise().uses_own_update
    assert SignFlip().uses_own_update and Scaled().uses_own_update
    assert Backdoor().local_epochs == 6 and LabelFlip().local_epochs is None
