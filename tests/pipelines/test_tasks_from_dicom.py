"""Each task reads real DICOM (and NIfTI labels) through MONAI, trains under DP and evaluates."""

import numpy as np
import pytest

from pipelines.dataset import load_split
from pipelines.metrics import evaluate
from pipelines.networks import build_network
from pipelines.plan import parse_plan
from pipelines.synthetic import write_synthetic_federation
from pipelines.training import train_local

NETS = {
    "seg3d": ("UNet", {"channels": [4, 8], "strides": [2]}),
    "seg2d": ("BasicUNet", {"features": [4, 4, 8, 8, 16, 4]}),
    "cls3d": ("DenseNet121", {"init_features": 4, "growth_rate": 4, "block_config": [1, 1, 1, 1]}),
    "cls2d": ("DenseNet121", {"init_features": 4, "growth_rate": 4, "block_config": [1, 1, 1, 1]}),
}


@pytest.mark.parametrize("task", list(NETS))
def test_task_reads_dicom_trains_and_evaluates(tmp_path, task):
    size = {"seg3d": 16, "seg2d": 32, "cls3d": 64, "cls2d": 64}[task]  # DenseNet downsamples 32x
    [silo] = write_synthetic_federation(tmp_path / "data", silos=1, task=task, size=size, sizes=[8])
    network, args = NETS[task]
    plan = parse_plan({"name": "t", "task": task, "model": {"network": network, "args": args},
                       "training": {"local_epochs": 1, "batch_size": 4}, "federation": {"rounds": 1}})
    train = load_split(silo.datalist, "training", task=task, cache_dir=tmp_path / "cache")
    test = load_split(silo.datalist, "test", task=task, cache_dir=tmp_path / "cache")
    spatial = (size,) * plan.spatial_dims
    assert train.images.shape == (silo.n_train, 1, *spatial)
    if plan.is_segmentation:
        assert train.labels.shape == train.images.shape and set(np.unique(train.labels)) <= {0.0, 1.0}
    else:
        assert set(train.labels.tolist()) == {0, 1}
    # The second read comes from the cache and is identical.
    again = load_split(silo.datalist, "training", task=task, cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.images, train.images)
    model = build_network(plan, seed=0)
    result = train_local(model, train, plan, seed=0)
    assert result.privacy.epsilon > 0
    metrics = evaluate(model, test, plan)
    expected = {"dice"} if plan.is_segmentation else {"accuracy"}
    assert expected <= set(metrics) and all(0.0 <= metrics[k] <= 1.0 for k in expected)
