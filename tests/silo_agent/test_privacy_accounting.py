"""The ledger's epsilon against an independent computation of the same accountant.

The silo composes each dataset's spends with Opacus' RDP accountant (pipelines.training.composed_epsilon).
Here the same quantity is computed from the papers, with none of Opacus' code: the RDP of the Poisson-
subsampled Gaussian mechanism at integer orders, in exact binomial form summed in log space
(Mironov, Talwar, Zhang 2019, "Renyi Differential Privacy of the Sampled Gaussian Mechanism",
arXiv:1908.10530, section 3.3), summed over steps and spends (RDP composes additively, Mironov 2017,
arXiv:1702.07476, Prop. 1), and converted to (epsilon, delta) with Balle et al. 2020 ("Hypothesis Testing
Interpretations and Renyi Differential Privacy", arXiv:1905.09982, Thm. 21), minimised over the orders.
Google's dp-accounting package would serve too, but it pins attrs<24, which this environment cannot take.
"""

from __future__ import annotations

import functools
import math

import pytest

from pipelines.training import composed_epsilon
from silo_agent.ledger import PrivacyLedger, Spend

ORDERS = (*range(2, 65), 80, 96, 128, 192, 256)


@functools.lru_cache(maxsize=None)
def _rdp_one_step(q: float, sigma: float, alpha: int) -> float:
    """RDP of one step of the sampled Gaussian mechanism at integer order alpha (exact binomial expansion),
    summed in log space: log sum_k C(alpha,k) (1-q)^(alpha-k) q^k exp((k^2-k) / (2 sigma^2))."""
    logs = []
    for k in range(alpha + 1):
        if q == 1.0 and k < alpha:
            continue  # (1-q)^(alpha-k) = 0
        log_binom = math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
        tail = (alpha - k) * math.log1p(-q) if k < alpha else 0.0
        logs.append(log_binom + tail + k * math.log(q) + (k * k - k) / (2 * sigma * sigma))
    top = max(logs)
    return (top + math.log(math.fsum(math.exp(v - top) for v in logs))) / (alpha - 1)


def independent_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    best = math.inf
    for alpha in ORDERS:
        rdp = sum(steps * _rdp_one_step(q, sigma, alpha) for sigma, q, steps in history)
        eps = rdp + math.log((alpha - 1) / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        best = min(best, eps)
    return best


@pytest.mark.parametrize(("sigma", "q", "steps"), [
    (1.0, 0.01, 1000), (1.1, 0.1, 40), (2.0, 0.25, 16), (0.8, 0.05, 200), (4.0, 1.0, 10),
])
def test_one_spend_matches_the_independent_accountant(sigma, q, steps):
    ours = composed_epsilon([(sigma, q, steps)], delta=1e-5, accountant="rdp")
    theirs = independent_epsilon([(sigma, q, steps)], 1e-5)
    # Opacus also searches fractional orders, so it may find a slightly smaller epsilon, never a larger one.
    assert ours <= theirs * (1 + 1e-6)
    assert ours == pytest.approx(theirs, rel=0.03)


def test_spends_across_rounds_and_plans_compose_in_the_ledger(tmp_path):
    spends = [(1.2, 0.125, 32), (1.2, 0.125, 32), (0.9, 0.05, 100)]  # two rounds of one plan, then another plan
    with PrivacyLedger.for_site(tmp_path / "privacy") as ledger:
        for i, entry in enumerate(spends):
            history = ledger.history("ct") + [entry]
            ledger.record(Spend(dataset="ct", run_id=f"run{i // 2}", round=i % 2 + 1, plan_hash="ab" * 32, accountant="rdp",
                                noise_multiplier=entry[0], sample_rate=entry[1], steps=entry[2], delta=1e-5,
                                epsilon_after=composed_epsilon(history, delta=1e-5, accountant="rdp"), history=(entry,)))
        history = ledger.history("ct")
        final = ledger.spends("ct")[-1].epsilon_after
    assert sorted(history) == sorted(spends)  # every spend kept, durably
    theirs = independent_epsilon(spends, 1e-5)
    assert final == pytest.approx(theirs, rel=0.03) and final <= theirs * (1 + 1e-6)
    # Composition is tighter than adding each spend's epsilon (what a naive ledger would do).
    naive = sum(independent_epsilon([s], 1e-5) for s in spends)
    assert final < 0.8 * naive
