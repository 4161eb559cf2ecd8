"""Aggregation rules, one per module, chosen by name in the plan (``federation.aggregation.rule``).

Every rule class has ``name`` (the plan's rule name), ``__init__(**args)`` (the plan's
``federation.aggregation.args``; a bad or unknown argument raises ConfigError naming the plan key),
``min_updates()`` (the fewest updates it can aggregate), ``aggregate(updates, weights)`` -> one delta
(each tensor in its input dtype, the updates' names) raising ConfigError when there are too few
updates, and ``details`` (JSON-able facts about the last aggregation for the audit log).
"""

from __future__ import annotations

from fedsilo.errors import ConfigError
from coordinator.aggregation.bulyan import Bulyan
from coordinator.aggregation.centered_clipping import CenteredClipping
from coordinator.aggregation.fedavg import FedAvg
from coordinator.aggregation.geometric_median import GeometricMedian
from coordinator.aggregation.krum import Krum, MultiKrum
from coordinator.aggregation.median import Median
from coordinator.aggregation.norm_bounded_mean import NormBoundedMean
from coordinator.aggregation.trimmed_mean import TrimmedMean
from pipelines.plan import AGGREGATION_RULES

RULES = {cls.name: cls for cls in (FedAvg, Median, TrimmedMean, Krum, MultiKrum, Bulyan, GeometricMedian, CenteredClipping,
                                   NormBoundedMean)}
# The plan schema knows the names only (pipelines may not import the coordinator); keep the two in step.
assert tuple(RULES) == AGGREGATION_RULES, "pipelines.plan.AGGREGATION_RULES must list exactly the registered rules"


def build_rule(name: str, args: dict | None = None):
    try:
        cls = RULES[name]
    except KeyError:
        raise ConfigError(f"plan key 'federation.aggregation.rule': unknown rule '{name}'", fix=f"use one of: {', '.join(RULES)}") from None
    return cls(**(args or {}))


def rule_for_plan(federation):
    """The plan's rule (``pipelines.plan.FederationSpec``), checked against its ``min_silos``."""
    rule = build_rule(federation.aggregation.rule, federation.aggregation.args)
    if federation.min_silos < rule.min_updates():
        raise ConfigError(f"plan key 'federation.min_silos': {federation.aggregation.rule} with these args needs at least "
                          f"{rule.min_updates()} updates per round, min_silos is {federation.min_silos}",
                          fix=f"raise federation.min_silos to {rule.min_updates()} or lower the rule's f")
    return rule
