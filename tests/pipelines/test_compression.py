"""pipelines.compression: round trips within each mode's bound, numbers by hand, error feedback, the layout,
pass-through of non-floating tensors, and one refusal code per kind of malformed payload."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipelines.compression import (
    ERROR_CODES,
    FLOAT16_MAX,
    MODES,
    CompressionError,
    compress,
    decompress,
    payload_layout,
    payload_nbytes,
    topk_count,
)


def _model(seed: int = 0) -> dict[str, np.ndarray]:
    """A small model-shaped update: conv weight, bias, a scalar gain, a float64 tensor, an int counter."""
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": (rng.normal(size=(8, 4, 3, 3)) * 0.02).astype(np.float32),
        "conv.bias": (rng.normal(size=(8,)) * 0.001).astype(np.float32),
        "act.weight": np.asarray([0.25], dtype=np.float32),
        "head.weight": rng.normal(size=(3, 8)).astype(np.float64),
        "bn.num_batches_tracked": np.asarray(7, dtype=np.int64),
    }


FLOATS = ("conv.weight", "conv.bias", "act.weight", "head.weight")


# ------------------------------------------------------------------------------------ round trips


def test_float32_round_trip_is_exact_and_keeps_reference_dtypes() -> None:
    delta = _model()
    payload, residual = compress(delta, "float32")
    assert residual is None and payload["head.weight"].dtype == np.float32
    out = decompress(payload, delta, "float32")
    assert list(out) == list(delta)
    for name in delta:
        assert out[name].dtype == delta[name].dtype and out[name].shape == delta[name].shape
    np.testing.assert_array_equal(out["conv.weight"], delta["conv.weight"])
    np.testing.assert_allclose(out["head.weight"], delta["head.weight"], rtol=2**-24)


def test_float16_relative_error_and_clipping() -> None:
    delta = _model()
    delta["conv.bias"][:3] = [1e-6, 3e5, -1e9]  # subnormal in float16, beyond its range twice
    out = decompress(compress(delta, "float16")[0], delta, "float16")
    for name in FLOATS:
        x, y = delta[name].astype(np.float64), out[name].astype(np.float64)
        inside = np.abs(x) <= FLOAT16_MAX
        normal = inside & (np.abs(x) >= 2.0**-14)
        # IEEE half: 11 significant bits -> relative error <= 2**-11 for normal numbers; subnormal spacing 2**-24.
        assert np.all(np.abs(y - x)[normal] <= 2.0**-11 * np.abs(x)[normal])
        assert np.all(np.abs(y - x)[inside & ~normal] <= 2.0**-25)
    assert out["conv.bias"][1] == FLOAT16_MAX and out["conv.bias"][2] == -FLOAT16_MAX


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float16_is_bit_identical_to_numpy_rounding(dtype) -> None:
    # compress writes float16 subnormals itself (numpy's converter is slow there): same bits as astype(float16).
    rng = np.random.default_rng(4)
    x = np.concatenate([rng.standard_normal(20_000) * sd for sd in (1e-2, 1e-4, 1e-6, 1e-8)]).astype(dtype)
    edges = [0.0, -0.0, 2.0**-14, -(2.0**-14) * (1 - 2.0**-12), 2.0**-25, 3 * 2.0**-26, -(2.0**-24), 5e-8, 65504.0, -65519.0]
    x[: len(edges)] = edges
    payload, _ = compress({"w": x}, "float16")
    np.testing.assert_array_equal(payload["w"].view(np.uint16), x.astype(np.float16).view(np.uint16))


def test_int8_by_hand() -> None:
    # range 0..255: scale 1, offset 0; integer entries are grid points, so stochastic rounding is exact there.
    delta = {"w": np.asarray([0.0, 1.0, 254.0, 255.0], dtype=np.float32)}
    payload, _ = compress(delta, "int8", rng=np.random.default_rng(0))
    assert payload["w/scale"][()] == 1.0 and payload["w/offset"][()] == 0.0 and payload["w/scale"].shape == ()
    assert payload["w/q"].tolist() == [-128, -127, 126, 127]
    # 127.5 sits halfway between two grid points: it becomes 127 or 128, each about half the time.
    half = {"w": np.asarray([0.0, 127.5, 255.0], dtype=np.float32)}
    rng = np.random.default_rng(1)
    decoded = [decompress(compress(half, "int8", rng=rng)[0], half, "int8")["w"][1] for _ in range(400)]
    assert set(decoded) == {127.0, 128.0}
    assert 0.4 < decoded.count(128.0) / 400 < 0.6


def test_int8_error_below_one_scale_and_unbiased() -> None:
    delta = _model(3)
    rng = np.random.default_rng(7)
    draws = []
    for _ in range(800):
        payload, residual = compress(delta, "int8", rng=rng)
        assert residual is None
        out = decompress(payload, delta, "int8")
        for name in FLOATS:
            scale = float(payload[f"{name}/scale"])
            assert np.all(np.abs(out[name] - delta[name]) <= scale * (1 + 1e-4) + 1e-7)
        draws.append(out["conv.weight"].astype(np.float64))
    # Unbiased: the mean of 800 independent decodes is within 5 standard errors (each error's sd <= scale/2).
    scale = float(compress(delta, "int8", rng=rng)[0]["conv.weight/scale"])
    mean_error = np.abs(np.mean(draws, axis=0) - delta["conv.weight"])
    assert mean_error.max() <= 5 * (scale / 2) / math.sqrt(800)


def test_int8_constant_and_empty_tensors() -> None:
    delta = {"c": np.full((4, 2), -0.5, np.float32), "e": np.zeros((0, 3), np.float32)}
    payload, _ = compress(delta, "int8")
    assert payload["c/scale"][()] == 0.0 and payload["c/q"].tolist() == [[-128] * 2] * 4
    out = decompress(payload, delta, "int8")
    np.testing.assert_array_equal(out["c"], delta["c"])
    assert out["e"].shape == (0, 3)


def test_topk_by_hand_one_global_selection() -> None:
    delta = {"a": np.asarray([1.0, -5.0, 2.0], np.float32), "b": np.asarray([[0.5, 4.0], [-3.0, 0.0]], np.float32)}
    # total 7 entries, fraction 0.3: k = ceil(2.1) = 3: -5 (a[1]), 4 (b[0,1] = flat 1), -3 (b[1,0] = flat 2)
    payload, residual = compress(delta, "topk", topk_fraction=0.3)
    assert payload["a/idx"].tolist() == [1] and payload["a/val"].tolist() == [-5.0]
    assert payload["b/idx"].tolist() == [1, 2] and payload["b/val"].tolist() == [4.0, -3.0]
    assert payload["a/idx"].dtype == np.int32 and payload["b/val"].dtype == np.float32
    out = decompress(payload, delta, "topk", topk_fraction=0.3)
    assert out["a"].tolist() == [0.0, -5.0, 0.0] and out["b"].tolist() == [[0.0, 4.0], [-3.0, 0.0]]
    assert residual["a"].tolist() == [1.0, 0.0, 2.0] and residual["b"].tolist() == [[0.5, 0.0], [0.0, 0.0]]
    # A tensor with nothing selected still travels, as two empty arrays.
    payload, _ = compress({"big": np.asarray([9.0, 8.0]), "small": np.asarray([0.1])}, "topk", topk_fraction=0.5)
    assert payload["small/idx"].size == 0 and payload["small/val"].size == 0


def test_topk_round_trip_keeps_the_largest_exactly() -> None:
    delta = _model(5)
    fraction = 0.05
    payload, residual = compress(delta, "topk", topk_fraction=fraction)
    out = decompress(payload, delta, "topk", topk_fraction=fraction)
    flat = np.concatenate([delta[n].ravel() for n in FLOATS])
    sent = np.concatenate([out[n].ravel() for n in FLOATS])
    k = topk_count(flat.size, fraction)
    kept = sent != 0
    assert kept.sum() == k
    np.testing.assert_array_equal(sent[kept], flat[kept].astype(np.float32))
    assert np.abs(flat[kept]).min() >= np.abs(flat[~kept]).max()  # the k largest magnitudes
    for n in FLOATS:  # residual + sent = delta
        np.testing.assert_allclose(residual[n] + out[n], delta[n], rtol=1e-6, atol=1e-7)
    assert set(residual) == set(FLOATS)


@pytest.mark.parametrize(("total", "fraction", "k"), [(100, 0.07, 7), (7, 0.3, 3), (10, 0.01, 1), (3, 1.0, 3), (0, 0.5, 0),
                                                      (28365, 0.01, 284)])
def test_topk_count(total, fraction, k) -> None:
    assert topk_count(total, fraction) == k


def test_error_feedback_sends_everything_over_rounds() -> None:
    # Stich et al. 2018 (arXiv:1809.07599), Lemma 3.2 with a constant update g and top-k, a delta-contraction
    # with delta = k/d: ||residual||^2 <= 4 (1 - delta) / delta^2 ||g||^2. And by construction
    # sum of what was sent over T rounds = T g - residual_T, so the mean sent -> g as long as the residual stays bounded.
    delta = _model(11)
    floats = {n: delta[n] for n in FLOATS}
    d = sum(x.size for x in floats.values())
    fraction = 0.02
    k = topk_count(d, fraction)
    bound = math.sqrt(4 * (1 - k / d) / (k / d) ** 2) * math.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in floats.values()))
    residual, total_sent = None, {n: np.zeros(x.shape) for n, x in floats.items()}
    rounds = 300
    for _ in range(rounds):
        payload, residual = compress(delta, "topk", topk_fraction=fraction, residual=residual)
        out = decompress(payload, delta, "topk", topk_fraction=fraction)
        for n in floats:
            total_sent[n] += out[n]
        norm = math.sqrt(sum(float(np.sum(r.astype(np.float64) ** 2)) for r in residual.values()))
        assert norm <= bound
    for n, x in floats.items():
        np.testing.assert_allclose(total_sent[n] + residual[n], rounds * x.astype(np.float64), rtol=1e-4, atol=1e-4)
    err = math.sqrt(sum(float(np.sum((total_sent[n] / rounds - x) ** 2)) for n, x in floats.items()))
    ref = math.sqrt(sum(float(np.sum(x.astype(np.float64) ** 2)) for x in floats.values()))
    assert err / ref < 0.05  # one round without memory loses ~all but the top 2%: here 300 rounds recover it


def test_non_floating_tensors_pass_through_every_mode() -> None:
    delta = _model()
    for mode in MODES:
        payload, _ = compress(delta, mode, topk_fraction=0.1)
        assert payload["bn.num_batches_tracked"].dtype == np.int64 and payload["bn.num_batches_tracked"] == 7
        out = decompress(payload, delta, mode, topk_fraction=0.1)
        assert out["bn.num_batches_tracked"].dtype == np.int64 and out["bn.num_batches_tracked"] == 7


@pytest.mark.parametrize("mode", MODES)
def test_layout_matches_what_compress_produces(mode) -> None:
    delta = _model(2)
    layout = payload_layout(delta, mode, 0.03)
    payload, _ = compress(delta, mode, topk_fraction=0.03)
    assert list(payload) == list(layout)
    for name, slot in layout.items():
        assert payload[name].dtype.str == slot.dtype
        assert payload[name].shape == slot.shape if slot.shape is not None else payload[name].ndim == 1
        assert payload[name].size <= slot.max_elements
    expected_bytes = {"float32": 4, "float16": 2, "int8": 1}
    floats = sum(delta[n].size for n in FLOATS)
    if mode in expected_bytes:
        extra = 8 * len(FLOATS) if mode == "int8" else 0
        assert payload_nbytes(payload) == floats * expected_bytes[mode] + extra + 8  # + the int64 counter
    else:
        assert payload_nbytes(payload) == topk_count(floats, 0.03) * 8 + 8


def test_compress_refuses_bad_input() -> None:
    delta = _model()
    bad = dict(delta, **{"conv.bias": np.full(8, np.nan, np.float32)})
    for mode in MODES:
        with pytest.raises(CompressionError) as err:
            compress(bad, mode)
        assert err.value.code == "non_finite" and "conv.bias" in str(err.value)
    with pytest.raises(CompressionError) as err:
        compress(delta, "topk", residual={"conv.weight": np.zeros((8, 4, 3, 3))})
    assert err.value.code == "residual_mismatch"
    residual = compress(delta, "topk")[1]
    residual["conv.bias"] = np.zeros(9, np.float32)
    with pytest.raises(CompressionError) as err:
        compress(delta, "topk", residual=residual)
    assert err.value.code == "residual_mismatch"
    with pytest.raises(ValueError, match="float32, float16, int8, topk"):
        compress(delta, "int4")
    with pytest.raises(ValueError, match="topk_fraction"):
        compress(delta, "topk", topk_fraction=0.0)


# ------------------------------------------------------------------------------ malformed payloads


def _corrupt(payload: dict[str, np.ndarray], name: str, value) -> dict[str, np.ndarray]:
    out = dict(payload)
    out[name] = value
    return out


def _drop(payload, name):
    return {k: v for k, v in payload.items() if k != name}


FRACTION = 0.05


def _valid(mode: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    delta = _model(9)
    return compress(delta, mode, topk_fraction=FRACTION, rng=np.random.default_rng(0))[0], delta


def _spread_too_many(p, ref):
    """k + 1 entries in total, each tensor within its own limit: only the global count catches it."""
    k = topk_count(sum(ref[n].size for n in FLOATS), FRACTION)
    out = dict(p)
    out["conv.weight/idx"], out["conv.weight/val"] = np.arange(k, dtype=np.int32), np.ones(k, np.float32)
    out["conv.bias/idx"], out["conv.bias/val"] = np.arange(1, dtype=np.int32), np.ones(1, np.float32)
    return out


def _edit_idx(p, edit):
    """Change the indices of head.weight (24 entries of scale 1: it holds most of the k selected), keeping the total <= k."""
    assert p["head.weight/idx"].size >= 2
    return _corrupt(p, "head.weight/idx", edit(p["head.weight/idx"]).astype(np.int32))


CORRUPTIONS = [
    # (name, mode, corruption, expected code)
    ("missing tensor", "float32", lambda p, r: _drop(p, "conv.bias"), "missing_array"),
    ("missing int8 scale", "int8", lambda p, r: _drop(p, "conv.bias/scale"), "missing_array"),
    ("missing topk values", "topk", lambda p, r: _drop(p, "act.weight/val"), "missing_array"),
    ("missing pass-through", "float16", lambda p, r: _drop(p, "bn.num_batches_tracked"), "missing_array"),
    ("extra array", "float32", lambda p, r: _corrupt(p, "evil", np.zeros(3, np.float32)), "unexpected_array"),
    ("dense name in int8", "int8", lambda p, r: _corrupt(p, "conv.bias", r["conv.bias"]), "unexpected_array"),
    ("list not array", "float32", lambda p, r: _corrupt(p, "conv.bias", [0.0] * 8), "not_an_array"),
    ("float64 in float32 mode", "float32", lambda p, r: _corrupt(p, "conv.bias", p["conv.bias"].astype(np.float64)), "wrong_dtype"),
    ("float32 in float16 mode", "float16", lambda p, r: _corrupt(p, "conv.bias", p["conv.bias"].astype(np.float32)), "wrong_dtype"),
    ("uint8 q", "int8", lambda p, r: _corrupt(p, "conv.weight/q", p["conv.weight/q"].view(np.uint8)), "wrong_dtype"),
    ("int64 idx", "topk", lambda p, r: _corrupt(p, "conv.weight/idx", p["conv.weight/idx"].astype(np.int64)), "wrong_dtype"),
    ("big-endian values", "float32", lambda p, r: _corrupt(p, "conv.bias", p["conv.bias"].astype(">f4")), "wrong_dtype"),
    ("object array", "float32", lambda p, r: _corrupt(p, "conv.bias", np.array([None] * 8, dtype=object)), "wrong_dtype"),
    ("counter as int32", "float32", lambda p, r: _corrupt(p, "bn.num_batches_tracked", np.asarray(7, np.int32)), "wrong_dtype"),
    ("transposed tensor", "float32", lambda p, r: _corrupt(p, "head.weight", p["head.weight"].T.copy()), "wrong_shape"),
    ("scale as vector", "int8", lambda p, r: _corrupt(p, "conv.bias/scale", np.ones(2, np.float32)), "wrong_shape"),
    ("2-D idx", "topk", lambda p, r: _corrupt(p, "conv.weight/idx", p["conv.weight/idx"].reshape(1, -1)), "wrong_shape"),
    ("more entries than the tensor", "topk",
     lambda p, r: dict(p, **{"act.weight/idx": np.arange(2, dtype=np.int32), "act.weight/val": np.ones(2, np.float32)}),
     "too_many_elements"),
    ("k + 1 entries over two tensors", "topk", _spread_too_many, "too_many_elements"),
    ("val shorter than idx", "topk", lambda p, r: _corrupt(p, "head.weight/val", p["head.weight/val"][:-1].copy()), "length_mismatch"),
    ("index past the end", "topk", lambda p, r: _edit_idx(p, lambda i: np.append(i[:-1], np.int32(24))), "index_out_of_range"),
    ("negative index", "topk", lambda p, r: _edit_idx(p, lambda i: np.append(np.int32(-1), i[1:])), "index_out_of_range"),
    ("decreasing indices", "topk", lambda p, r: _edit_idx(p, lambda i: i[::-1].copy()), "indices_not_increasing"),
    ("duplicate index", "topk", lambda p, r: _edit_idx(p, lambda i: np.append(i[:1], i[:-1])), "indices_not_increasing"),
    ("NaN in float32", "float32", lambda p, r: _corrupt(p, "conv.bias", np.full(8, np.nan, np.float32)), "non_finite"),
    ("inf in float16", "float16", lambda p, r: _corrupt(p, "conv.bias", np.full(8, np.inf, np.float16)), "non_finite"),
    ("inf topk value", "topk", lambda p, r: _corrupt(p, "head.weight/val", np.append(np.float32(np.inf), p["head.weight/val"][1:])),
     "non_finite"),
    ("NaN offset", "int8", lambda p, r: _corrupt(p, "conv.bias/offset", np.asarray(np.nan, np.float32)), "non_finite"),
    ("scale and offset overflow", "int8",
     lambda p, r: dict(p, **{"conv.bias/scale": np.asarray(3e38, np.float32), "conv.bias/offset": np.asarray(3e38, np.float32)}),
     "non_finite"),
    ("negative scale", "int8", lambda p, r: _corrupt(p, "conv.bias/scale", np.asarray(-0.1, np.float32)), "bad_scale"),
    ("NaN scale", "int8", lambda p, r: _corrupt(p, "conv.bias/scale", np.asarray(np.nan, np.float32)), "bad_scale"),
    ("infinite scale", "int8", lambda p, r: _corrupt(p, "conv.bias/scale", np.asarray(np.inf, np.float32)), "bad_scale"),
]


@pytest.mark.parametrize(("mode", "corrupt", "code"), [c[1:] for c in CORRUPTIONS], ids=[c[0] for c in CORRUPTIONS])
def test_malformed_payload_is_refused_with_its_code(mode, corrupt, code) -> None:
    payload, reference = _valid(mode)
    decompress(payload, reference, mode, topk_fraction=FRACTION)  # the valid payload decodes
    with pytest.raises(CompressionError) as err:
        decompress(corrupt(payload, reference), reference, mode, topk_fraction=FRACTION)
    assert err.value.code == code and code in ERROR_CODES
    text = str(err.value)
    assert "\n" not in text and text == err.value.message
    assert "nan" not in text.lower() or "NaN or infinite" in text  # names the defect, never prints the values


def test_every_refusal_code_is_exercised() -> None:
    exercised = {c[3] for c in CORRUPTIONS} | {"residual_mismatch"}
    assert exercised == set(ERROR_CODES)


def test_decompress_against_a_different_fraction_refuses_the_excess() -> None:
    # The coordinator decodes with the plan's fraction: a silo sending 5% under a 1% plan is refused.
    payload, reference = _valid("topk")
    with pytest.raises(CompressionError) as err:
        decompress(payload, reference, "topk", topk_fraction=0.01)
    assert err.value.code == "too_many_elements"
