"""Evaluation: Dice for segmentation; accuracy and ROC AUC for classification.

Dice (Dice 1945; as ``monai.metrics.compute_dice``) is computed per case on the thresholded
sigmoid output and averaged over cases; a case whose label and prediction are both empty
scores 1. AUC is the Mann-Whitney form of the ROC area (``monai.metrics.compute_roc_auc``).
"""

from __future__ import annotations

import math

import torch

from pipelines.dataset import CaseArrays
from pipelines.plan import Plan
from pipelines.training import make_loss


@torch.no_grad()
@torch.no_grad()  # no autograd graph: a silo evaluates right before it trains the same model
def evaluate(model: torch.nn.Module, data: CaseArrays, plan: Plan, *, batch_size: int = 16) -> dict[str, float]:
    """The plan's metrics of ``model`` on ``data`` (``num-examples`` included)."""
    from monai.metrics import compute_dice, compute_roc_auc

    model.eval()
    loss_fn = make_loss(plan)
    images = torch.from_numpy(data.images)
    labels = torch.from_numpy(data.labels)
    losses, dices, probs = [], [], []
    for start in range(0, len(data), batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        logits = model(x)
        losses.append(float(loss_fn(logits, y)) * x.shape[0])
        if plan.is_segmentation:
            pred = (torch.sigmoid(logits) > 0.5).float()
            dices.append(compute_dice(pred, y, include_background=True, ignore_empty=False).flatten())
        else:
            probs.append(torch.softmax(logits, dim=1))
    out: dict[str, float] = {"num-examples": float(len(data)), "loss": sum(losses) / max(len(data), 1)}
    if plan.is_segmentation:
        out["dice"] = float(torch.cat(dices).nanmean())
    else:
        p = torch.cat(probs)
        out["accuracy"] = float((p.argmax(dim=1) == labels).float().mean())
        onehot = torch.nn.functional.one_hot(labels, num_classes=p.shape[1]).float()
        try:
            auc = float(compute_roc_auc(p, onehot, average="macro"))
        except (AssertionError, ValueError):  # a single class present: AUC undefined
            auc = math.nan
        out["auc"] = auc
    wanted = set(plan.metrics) | {"num-examples"}
    # A metric that is undefined here (AUC with one class present) is left out, not sent as NaN.
    return {k: v for k, v in out.items() if k in wanted and math.isfinite(v)}
