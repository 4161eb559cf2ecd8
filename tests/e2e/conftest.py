"""Shared set-up for runs through real SuperLink and SuperNode processes on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from silo_agent.site import init_site, register_dataset

# A plan small enough for 2 cores: 16^3 volumes, a tiny UNet, 2 rounds of 1 epoch.
E2E_PLAN = {
    "name": "e2e-seg3d",
    "task": "seg3d",
    "model": {"network": "UNet", "args": {"channels": [4, 8], "strides": [2]}},
    "data": {"dataset": "synthetic", "transforms": [{"name": "ScaleIntensity"}]},
    "training": {"local_epochs": 1, "batch_size": 8, "optimizer": {"name": "sgd", "lr": 0.5, "momentum": 0.9}, "loss": "dice"},
    "privacy": {"target_epsilon": 8.0, "target_delta": 1e-5, "max_grad_norm": 1.0},
    "federation": {"rounds": 2, "min_silos": 2, "round_timeout_s": 300, "wait_for_silos_s": 60},
    "metrics": ["loss", "dice"],
}


def _make_sites(root: Path, sizes: list[int], *, size: int = 16) -> tuple[list, list]:
    """Synthetic hospitals under root/data and a registered site folder each under root/sites."""
    from pipelines.synthetic import write_synthetic_federation

    silos = write_synthetic_federation(root / "data", silos=len(sizes), size=size, sizes=sizes)
    sites = []
    for silo in silos:
        site = init_site(root / "sites" / silo.name, silo.name)
        sites.append(register_dataset(site, "synthetic", task="seg3d", datalist=silo.datalist))
    return sites, silos


@pytest.fixture
def e2e_plan(tmp_path) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(E2E_PLAN), encoding="utf-8")
    return path


@pytest.fixture
def make_sites():
    return _make_sites
