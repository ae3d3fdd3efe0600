"""The training loss over one output, or over a deeply supervised network's outputs.

MONAI's `DeepSupervisionLoss` sums a loss over a list of outputs with given weights; the weights
here are nnU-Net's (1, 1/2, 1/4, ... from the full resolution down, normalised to sum to 1), so a
deeply supervised run's `train/loss` stays on the scale of a single-output run's.
"""

from collections.abc import Callable

import torch
from monai.losses import DeepSupervisionLoss


def output_weights(outputs: int) -> list[float]:
    halves = [0.5**level for level in range(outputs)]
    return [w / sum(halves) for w in halves]


def segmentation_loss(loss: Callable, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """`loss(logits, target)`; logits of shape (batch, outputs, classes, *patch), as MONAI's DynUNet
    returns them in training with deep supervision (one more dimension than the target), get the
    weighted sum over the outputs, the full-resolution one first."""
    if logits.dim() != target.dim() + 1:
        return loss(logits, target)
    weighted = DeepSupervisionLoss(loss, weights=output_weights(logits.shape[1]))
    return weighted(list(logits.unbind(1)), target)
