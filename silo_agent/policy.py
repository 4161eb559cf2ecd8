"""A site's policy (SITE_DIR/policy.yaml): what the hospital lets any plan do with its data.

Checked when an officer approves a plan and again on every train or evaluate message, so a policy
tightened after an approval still holds. Written with safe defaults at ``fedsilo silo init``; every
key may be edited. Unknown keys are errors (a misspelt limit must not silently allow everything).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedsilo.errors import ConfigError
from pipelines.networks import NETWORKS
from pipelines.plan import AGGREGATION_RULES, METRICS, Plan

POLICY_FILE = "policy.yaml"


@dataclass(frozen=True)
class SitePolicy:
    require_dp: bool = True
    max_epsilon_per_plan: float = 8.0
    lifetime_epsilon_per_dataset: float = 20.0
    max_delta: float = 1e-5
    allowed_networks: tuple[str, ...] = tuple(sorted(NETWORKS))
    min_silos: int = 2
    allowed_aggregation_rules: tuple[str, ...] = AGGREGATION_RULES
    max_rounds: int = 100
    allowed_metrics: tuple[str, ...] = METRICS

    def to_yaml(self) -> str:
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}
        return ("# Site policy: what any training plan may do with this site's data.\n"
                "# Checked at approval and again at every round. Edit with care; changes are audited.\n"
                + yaml.safe_dump(data, sort_keys=False))

    def violations(self, plan: Plan) -> list[str]:
        """Each way ``plan`` breaks this policy, as 'plan key: problem (policy key)'; empty when it complies."""
        out = []
        p, f = plan.privacy, plan.federation
        if self.require_dp and not p.enabled:
            out.append("privacy.enabled: the site requires differential privacy (require_dp)")
        if p.enabled and p.target_epsilon > self.max_epsilon_per_plan:
            out.append(f"privacy.target_epsilon: {p.target_epsilon} exceeds the site's {self.max_epsilon_per_plan} (max_epsilon_per_plan)")
        if p.enabled and p.target_delta > self.max_delta:
            out.append(f"privacy.target_delta: {p.target_delta} exceeds the site's {self.max_delta} (max_delta)")
        if plan.model.network not in self.allowed_networks:
            out.append(f"model.network: {plan.model.network} is not allowed here (allowed_networks: {', '.join(self.allowed_networks)})")
        if f.min_silos < self.min_silos:
            out.append(f"federation.min_silos: {f.min_silos} is below the site's minimum of {self.min_silos} (min_silos)")
        if f.aggregation.rule not in self.allowed_aggregation_rules:
            out.append(f"federation.aggregation.rule: {f.aggregation.rule} is not allowed here "
                       f"(allowed_aggregation_rules: {', '.join(self.allowed_aggregation_rules)})")
        if f.rounds > self.max_rounds:
            out.append(f"federation.rounds: {f.rounds} exceeds the site's {self.max_rounds} (max_rounds)")
        extra = [m for m in plan.metrics if m not in self.allowed_metrics]
        if extra:
            out.append(f"metrics: {', '.join(extra)} may not leave this site (allowed_metrics: {', '.join(self.allowed_metrics)})")
        return out


def policy_path(site_root: Path) -> Path:
    return Path(site_root) / POLICY_FILE


def write_default_policy(site_root: Path) -> Path:
    path = policy_path(site_root)
    if not path.exists():
        path.write_text(SitePolicy().to_yaml(), encoding="utf-8")
    return path


def policy_digest(site_root: Path) -> str | None:
    path = policy_path(site_root)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def load_policy(site_root: Path) -> SitePolicy:
    """Read and check SITE_DIR/policy.yaml; a missing file is an error (a site without a policy runs nothing)."""
    path = policy_path(site_root)
    if not path.is_file():
        raise ConfigError(f"site policy {path} is missing", fix=f"restore it, or write the defaults with: fedsilo silo policy reset --site {site_root}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError:
        raise ConfigError(f"{path} is not valid YAML", fix="fix the file; fedsilo silo policy check --site SITE_DIR shows the problem") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping of policy keys", fix="start from the defaults: fedsilo silo policy reset")
    defaults = SitePolicy()
    known = defaults.__dict__
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{path}: unknown policy key '{unknown[0]}'", fix=f"use only: {', '.join(known)}")
    values: dict[str, Any] = {}
    for key, default in known.items():
        value = raw.get(key, default)
        where = f"{path.name}: '{key}'"
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{where} must be true or false, got {value!r}", fix=f"write true or false (default {str(default).lower()})")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{where} must be a whole number >= 1, got {value!r}", fix=f"write a whole number, e.g. {default}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{where} must be a positive number, got {value!r}", fix=f"write a positive number, e.g. {default}")
            value = float(value)
        else:
            allowed = {"allowed_networks": tuple(NETWORKS), "allowed_aggregation_rules": AGGREGATION_RULES,
                       "allowed_metrics": METRICS}[key]
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where} must be a list of names, got {value!r}", fix=f"choose from: {', '.join(allowed)}")
            bad = [v for v in value if v not in allowed]
            if bad:
                raise ConfigError(f"{where}: '{bad[0]}' is not known", fix=f"choose from: {', '.join(allowed)}")
            value = tuple(value)
        values[key] = value
    return SitePolicy(**values)
