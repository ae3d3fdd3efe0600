"""The training loss over one output, or over a deeply supervised network's outputs with nnU-Net's weights
(1, 1/2, 1/4, ... from the full resolution down, normalised to sum to 1): `train/loss` keeps its scale."""

from collections.abc import Callable

import torch
from monai.losses import DeepSupervisionLoss


def output_weights(outputs: int) -> list[float]:
    halves = [0.5**level for level in range(outputs)]
    return [w / sum(halves) for w in halves]


def segmentation_loss(loss: Callable, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`loss(logits, target)`, or its weighted sum over DynUNet's deeply supervised (batch, outputs, ...)."""
    if logits.dim() != target.dim() + 1:
        return loss(logits, target)
    weighted = DeepSupervisionLoss(loss, weights=output_weights(logits.shape[1]))
    return weighted(list(logits.unbind(1)), target)
