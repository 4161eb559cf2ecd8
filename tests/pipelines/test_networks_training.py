"""Every allow-listed network trains under DP-SGD; accounting carries across rounds."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.dataset import CaseArrays
from pipelines.metrics import evaluate
from pipelines.networks import NETWORKS, build_network
from pipelines.plan import parse_plan
from pipelines.training import composed_epsilon, plan_noise_multiplier, train_local

SMALL_ARGS = {
    "UNet": {"channels": [4, 8], "strides": [2]},
    "BasicUNet": {"features": [4, 4, 8, 8, 16, 4]},
    "SegResNet": {"init_filters": 8, "blocks_down": [1, 1], "blocks_up": [1]},
    "DenseNet121": {"init_features": 4, "growth_rate": 4, "block_config": [1, 1, 1, 1]},
    "EfficientNetBN": {"model_name": "efficientnet-b0"},
}


def make_plan(network: str, task: str, **training) -> object:
    return parse_plan({
        "name": "t", "task": task, "model": {"network": network, "args": SMALL_ARGS[network]},
        "training": {"local_epochs": 1, "batch_size": 4, **training},
        "privacy": {"target_epsilon": 8.0}, "federation": {"rounds": 2},
    })


def data(task: str, n: int = 8, size: int = 16) -> CaseArrays:
    rs = np.random.RandomState(0)
    spatial = (size,) * (3 if task.endswith("3d") else 2)
    images = rs.rand(n, 1, *spatial).astype(np.float32)
    if task.startswith("seg"):
        return CaseArrays(images, (images > 0.5).astype(np.float32))
    return CaseArrays(images, (np.arange(n) % 2).astype(np.int64))


@pytest.mark.parametrize("network", list(NETWORKS))
def test_each_network_trains_under_dp(network):
    # 3D where it is cheap on 2 cores, 2D for the deeper networks; the grad-sample mode is the same.
    task = ("seg" if "seg" in NETWORKS[network].tasks else "cls") + ("3d" if network in ("UNet", "SegResNet") else "2d")
    plan = make_plan(network, task)
    model = build_network(plan, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    size = {"BasicUNet": 32, "DenseNet121": 32, "EfficientNetBN": 32}.get(network, 16)
    result = train_local(model, data(task, size=size), plan, seed=1)
    assert result.privacy is not None and result.privacy.epsilon > 0
    changed = [k for k, v in result.state_dict.items() if v.dtype.is_floating_point and not torch.equal(v, before[k])]
    assert changed, "DP training changed no weight"
    assert set(result.state_dict) == set(before)  # no Opacus "_module." prefixes leak out


def test_models_built_with_the_same_seed_are_identical():
    plan = make_plan("UNet", "seg3d")
    a, b = build_network(plan, seed=3).state_dict(), build_network(plan, seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_accountant_history_composes_across_rounds_and_hits_the_target():
    plan = make_plan("UNet", "seg2d")
    cases = data("seg2d", n=16)
    nm = plan_noise_multiplier(plan, len(cases))
    history = []
    epsilons = []
    for round_ in range(plan.federation.rounds):
        result = train_local(build_network(plan, seed=0), cases, plan, history=history, noise_multiplier=nm, seed=round_)
        history.append(result.privacy.entry)
        epsilons.append(result.privacy.epsilon)
    assert epsilons[0] < epsilons[1]
    assert epsilons[1] == pytest.approx(composed_epsilon(history, delta=1e-5, accountant="rdp"), rel=1e-9)
    # The plan's noise multiplier is chosen so that all rounds together spend the target.
    assert epsilons[-1] == pytest.approx(plan.privacy.target_epsilon, rel=0.02)


def test_non_private_training_reports_no_privacy_and_evaluates():
    plan = make_plan("UNet", "seg2d")
    model = build_network(plan, seed=0)
    result = train_local(model, data("seg2d"), plan, private=False)
    assert result.privacy is None
    metrics = evaluate(model, data("seg2d"), plan)
    assert set(metrics) == {"num-examples", "loss", "dice"} and 0.0 <= metrics["dice"] <= 1.0


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "configs" / "plans").glob("*.yaml")), ids=lambda p: p.stem)
def test_each_example_plan_trains_at_its_demo_data_size(path):
    from pipelines.plan import load_plan
    from pipelines.synthetic import DEFAULT_SIZE

    plan = load_plan(path)
    size = DEFAULT_SIZE[plan.task]
    images = np.random.RandomState(0).rand(6, 1, *(size,) * plan.spatial_dims).astype(np.float32)
    labels = (images > 0.5).astype(np.float32) if plan.is_segmentation else (np.arange(6) % 2).astype(np.int64)
    result = train_local(build_network(plan, seed=0), CaseArrays(images, labels), plan, epochs=1, seed=0)
    assert result.privacy is not None and 0 < result.privacy.epsilon
