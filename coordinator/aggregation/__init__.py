"""Aggregation rules, one per module, chosen by name in the plan (``federation.aggregation.rule``)."""

from __future__ import annotations

from fedsilo.errors import ConfigError
from coordinator.aggregation.fedavg import FedAvg

RULES = {FedAvg.name: FedAvg}


def build_rule(name: str, args: dict | None = None):
    try:
        cls = RULES[name]
    except KeyError:
        raise ConfigError(f"plan key 'federation.aggregation.rule': unknown rule '{name}'", fix=f"use one of: {', '.join(RULES)}") from None
    return cls(**(args or {}))
