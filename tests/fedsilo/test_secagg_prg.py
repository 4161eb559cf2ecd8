"""SecAgg+ masks from AES-256-CTR: deterministic per secret, uniform in range, installed in both Flower modules."""

from __future__ import annotations

import importlib

import numpy as np

from fedsilo.secagg_prg import install, pseudo_rand_gen


def test_masks_are_deterministic_per_secret_shaped_and_in_range():
    dims = [(3, 4), (), (1000,)]
    a, b = pseudo_rand_gen(b"k" * 32, 2**32, dims), pseudo_rand_gen(b"k" * 32, 2**32, dims)
    assert [x.shape for x in a] == dims and all(x.dtype == np.int64 for x in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    other = pseudo_rand_gen(b"l" * 32, 2**32, dims)
    assert not np.array_equal(a[2], other[2])
    big = pseudo_rand_gen(b"k" * 32, 2**32, [(200_000,)])[0]
    assert big.min() >= 0 and big.max() < 2**32 and abs(big.mean() / 2**32 - 0.5) < 0.01  # uniform over the range
    assert pseudo_rand_gen(b"k", 10, [(1000,)])[0].max() < 10


def test_pairwise_masks_cancel_modulo_the_range():
    """What SecAgg+ relies on: one silo adds the shared mask, the other subtracts it."""
    mask = pseudo_rand_gen(b"shared" * 6, 2**32, [(50,)])[0]
    x, y = np.arange(50, dtype=np.int64), np.arange(50, dtype=np.int64) * 3
    assert np.array_equal(((x + mask) + (y - mask)) % 2**32, (x + y) % 2**32)


def test_install_replaces_flowers_generator_in_the_mod_and_the_workflow():
    install()
    for name in ("flwr.client.mod.secure_aggregation.secaggplus_mod", "flwr.server.workflow.secure_aggregation.secaggplus_workflow"):
        assert importlib.import_module(name).pseudo_rand_gen is pseudo_rand_gen
