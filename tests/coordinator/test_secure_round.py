"""SecAgg+ settings and the quantization bound, checked against Flower's own quantization arithmetic.

The masks cancel in the sum (the e2e test runs the whole protocol); what is left is the arithmetic each
silo's ``secaggplus_mod`` and the coordinator's ``SecAggPlusWorkflow`` do on the values: weight, quantize,
sum modulo 2**32, dequantize, divide by the total weight. Replayed here with Flower's functions.
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.common.secure_aggregation.ndarrays_arithmetic import factor_combine, factor_extract, parameters_mod, parameters_multiply
from flwr.common.secure_aggregation.quantization import dequantize, quantize

from coordinator.secure_round import MAX_WEIGHT, MODULUS_RANGE, quantization_error_bound, secagg_parameters
from fedsilo.errors import FedsiloError


@pytest.mark.parametrize("n", [3, 4, 5, 8, 17, 100])
def test_settings_fit_the_modulus_and_need_more_than_half(n):
    p = secagg_parameters(n, 10.0)
    assert n * p["quantization_range"] < MODULUS_RANGE  # n quantized entries (and n weights) sum below the modulus
    assert p["quantization_range"] <= 2**30  # Flower rounds through int32
    assert p["reconstruction_threshold"] > n / 2 and p["reconstruction_threshold"] < p["num_shares"] == n
    assert p["clipping_range"] == 10.0 and p["max_weight"] == MAX_WEIGHT


def test_two_silos_are_refused():
    with pytest.raises(FedsiloError, match="at least 3 silos"):
        secagg_parameters(2, 1.0)


def _secure_mean(updates, weights, p, dtype):
    """What the silos (secaggplus_mod's collect stage) and the coordinator (unmask stage) compute, masks left out."""
    c, levels, w_max, n = p["clipping_range"], p["quantization_range"], p["max_weight"], len(updates)
    total = None
    for x, w in zip(updates, weights):
        q_ratio = round(min(w, w_max) / w_max * levels)
        vec = factor_combine(q_ratio, quantize(parameters_multiply([x.astype(dtype)], q_ratio / levels), c, levels))
        vec = [np.asarray(a, dtype=np.int64) for a in vec]
        total = vec if total is None else [a + b for a, b in zip(total, vec)]
    q_total, summed = factor_extract(parameters_mod(total, p["modulus_range"]))
    [mean] = dequantize(summed, c, levels)
    return (mean - (n - 1) * c) * (levels / q_total)


@pytest.mark.parametrize("n", [3, 4, 7])
def test_the_secure_mean_is_the_weighted_mean_within_the_bound(n):
    rng = np.random.default_rng(n)
    bound = 2.0
    updates = []
    for _ in range(n):
        x = rng.normal(0, 1e-3, 50_000)
        updates.append((x * min(1.0, bound / np.linalg.norm(x))).astype(np.float32))  # clipped at the silo
    weights = [float(w) for w in rng.integers(10, 400, n)]
    p = secagg_parameters(n, bound)
    exact = sum(x.astype(np.float64) * w for x, w in zip(updates, weights)) / sum(weights)
    limit = quantization_error_bound(p, weights)
    error = float(np.max(np.abs(_secure_mean(updates, weights, p, np.float64) - exact)))
    assert error <= limit
    assert limit < 1e-2 * float(np.max(np.abs(exact)))  # small against the update itself
    # In float32 (Flower's default for float32 updates) the 24-bit mantissa rounds away most levels: the
    # silos hand Flower float64 copies for this reason.
    assert float(np.max(np.abs(_secure_mean(updates, weights, p, np.float32) - exact))) > limit


def test_a_masked_reply_claiming_another_site_than_its_nodes_kit_key_is_left_out_of_the_sum():
    # The check runs on the masked reply before the sum: an identity mismatch is an UpdateRejected, which the round's
    # grid files under ``rejected`` and leaves out (its masks cancelled as a dropped silo's).
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    from coordinator.federation import FederatedRun
    from coordinator.secure_round import SecureOutcome, _RoundGrid
    from coordinator.validation import Expectation, UpdateRejected
    from fedsilo import protocol as P

    run = SimpleNamespace(node_keys={b"key3": "hospital3"}, kit_site={3: "hospital3"})
    run.check_registered = lambda node, site: FederatedRun.check_registered(run, node, site)
    grid = _RoundGrid(run, {"w": np.zeros(2, np.float32)}, Expectation(run_id="run-1", round=1), SecureOutcome(aggregate={}))
    content = RecordDict({P.IDENTITY: ConfigRecord({P.SITE: "hospital1", P.RUN_ID: "run-1", P.ROUND: 1}),
                          P.METRICS: MetricRecord({P.NUM_EXAMPLES: 10})})
    with pytest.raises(UpdateRejected) as caught:
        grid._check_masked(3, content, 100)
    assert caught.value.code == "identity-mismatch"
    with pytest.raises(UpdateRejected) as caught:  # the claim matches: the check goes on to the masked vectors
        grid._check_masked(3, RecordDict({**content, P.IDENTITY: ConfigRecord({P.SITE: "hospital3", P.RUN_ID: "run-1", P.ROUND: 1})}), 100)
    assert caught.value.code == "wrong-names"
    grid.outcome.contributions[4] = {"site": "hospital3"}  # another node's masked update already named hospital3
    with pytest.raises(UpdateRejected) as caught:
        grid._check_masked(3, RecordDict({**content, P.IDENTITY: ConfigRecord({P.SITE: "hospital3", P.RUN_ID: "run-1", P.ROUND: 1})}), 100)
    assert caught.value.code == "duplicate-site"
