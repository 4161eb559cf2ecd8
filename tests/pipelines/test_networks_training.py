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


def test_proximal_term_adds_mu_times_the_drift_to_the_gradient_by_hand():
    # FedProx: the step sees grad + mu * (w - w_global). Plain SGD, lr 0.5, mu 0.2, data gradient 0, drift 1:
    # w moves by -lr * mu * 1 = -0.1.
    from pipelines.training import add_proximal_term

    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(3.0)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    add_proximal_term(optimizer, layer, 0.2)
    with torch.no_grad():
        layer.weight.fill_(4.0)  # drifted 1.0 from the anchor
    layer.weight.grad = torch.zeros_like(layer.weight)
    optimizer.step()
    assert layer.weight.detach().flatten().tolist() == pytest.approx([3.9, 3.9])


def test_proximal_term_pulls_towards_a_given_anchor_by_name():
    # Ditto: the anchor is another model's weights (the round's global model), by parameter name. Weight 4 anchored
    # at 2 (not at its own 4): the step sees mu * (4 - 2) = 0.4, lr 0.5: w moves by -0.2.
    from pipelines.training import add_proximal_term

    layer = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        layer.weight.fill_(4.0)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    add_proximal_term(optimizer, layer, 0.2, anchor={"weight": np.full((1, 2), 2.0, np.float32)})
    layer.weight.grad = torch.zeros_like(layer.weight)
    optimizer.step()
    assert layer.weight.detach().flatten().tolist() == pytest.approx([3.8, 3.8])


@pytest.mark.parametrize("private", [False, True], ids=["no-dp", "dp"])
def test_fedprox_keeps_local_training_closer_to_the_global_model(private):
    # Same seed, same data and noise: a strong proximal weight must shrink the drift from the global weights,
    # also under DP-SGD, where the term is added after Opacus' clipping and noise.
    plan = make_plan("UNet", "seg2d", optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.0})
    cases = data("seg2d", n=8)

    def drift(mu: float) -> float:
        model = build_network(plan, seed=0)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        result = train_local(model, cases, plan, private=private, seed=3, epochs=3, fedprox_mu=mu)
        return sum(float(torch.sum((result.state_dict[k] - start[k]) ** 2)) for k in start if start[k].dtype.is_floating_point)

    plain, prox = drift(0.0), drift(1.0)  # lr * mu = 0.5: each step halves the drift it sees (mu * lr >= 2 would overshoot)
    assert 0 < prox < plain


def test_fedprox_mu_is_a_plan_key_that_keeps_old_plans_hashes():
    import yaml

    from pipelines.plan import load_plan

    path = Path(__file__).resolve().parents[2] / "configs" / "plans" / "seg3d-unet-dp.yaml"
    plan = load_plan(path)
    assert plan.training.fedprox_mu == 0.0 and "fedprox_mu" not in plan.to_dict()["training"]
    raw = yaml.safe_load(path.read_text())
    raw["training"]["fedprox_mu"] = 0.01
    prox = parse_plan(raw)
    assert prox.training.fedprox_mu == 0.01 and prox.hash() != plan.hash()
    assert parse_plan(prox.to_dict()).hash() == prox.hash()


def test_finetune_lr_scale_is_the_linear_scaling_rule_capped_at_one():
    from pipelines.training import finetune_lr_scale

    assert [finetune_lr_scale(n, 64) for n in (16, 32, 64, 128)] == [0.25, 0.5, 1.0, 1.0]
    assert finetune_lr_scale(0, 8) == 0.0
    with pytest.raises(ValueError, match="the batch >= 1"):
        finetune_lr_scale(16, 0)


@pytest.mark.parametrize("private", [False, True], ids=["no-dp", "dp"])
def test_lr_scale_scales_the_step_and_nothing_else(private):
    # One SGD step without momentum (4 cases, batch 4): the same seed draws the same batch and, under DP, the same
    # noise, so the update at lr x 0.25 is 0.25 times the update at the plan's lr, and the privacy spent is the same.
    plan = make_plan("UNet", "seg2d", optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.0})
    cases = data("seg2d", n=4)

    def update(scale: float):
        model = build_network(plan, seed=0)
        start = {k: v.clone() for k, v in model.state_dict().items()}
        result = train_local(model, cases, plan, private=private, seed=3, epochs=1, lr_scale=scale)
        return {k: (result.state_dict[k] - start[k]).numpy() for k in start if start[k].dtype.is_floating_point}, result.privacy

    full, spent_full = update(1.0)
    quarter, spent_quarter = update(0.25)
    assert sum(float(np.abs(v).sum()) for v in full.values()) > 0
    for name, value in full.items():
        np.testing.assert_allclose(quarter[name], 0.25 * value, rtol=1e-4, atol=1e-7)
    assert (spent_full is None) == (not private) and spent_full == spent_quarter
    with pytest.raises(ValueError, match="must be a positive number"):
        train_local(build_network(plan, seed=0), cases, plan, private=private, lr_scale=0.0)
