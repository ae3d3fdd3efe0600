"""The configured loss and the validation metric against values computed by hand."""

import math

import torch
from hydra.utils import instantiate
from torchmetrics.segmentation import DiceScore

from .conftest import compose_config


def test_soft_dice_loss_matches_the_reference_formula(tmp_path):
    loss_fn = instantiate(compose_config(tmp_path).loss)
    # 2 classes, 4 voxels; logits chosen so that softmax gives p1 = (0.5, 0.5, 0.5, 0.5) exactly
    logits = torch.zeros(1, 2, 4, 1, 1)
    target = torch.tensor([0.0, 1.0, 1.0, 0.0]).reshape(1, 1, 4, 1, 1)
    # per class c: 1 - 2*sum(y*p) / (sum(y^2) + sum(p^2)); y has 2 voxels of each class, p = 0.5 everywhere
    # sum(y*p) = 1, sum(y^2) = 2, sum(p^2) = 1  ->  1 - 2/3 for both classes; MONAI adds 1e-5 on both sides
    expected = 1 - (2 * 1 + 1e-5) / (2 + 1 + 1e-5)
    assert math.isclose(float(loss_fn(logits, target)), expected, rel_tol=1e-6)


def test_soft_dice_loss_with_uneven_probabilities(tmp_path):
    loss_fn = instantiate(compose_config(tmp_path).loss)
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]]).reshape(1, 2, 2, 1, 1)  # p1 = (0.75, 0.5)
    target = torch.tensor([1.0, 0.0]).reshape(1, 1, 2, 1, 1)
    p1, p0 = torch.tensor([0.75, 0.5]), torch.tensor([0.25, 0.5])
    y1, y0 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])

    def dice_loss(p, y):
        return 1 - (2 * (y * p).sum() + 1e-5) / ((y**2).sum() + (p**2).sum() + 1e-5)

    expected = (dice_loss(p0, y0) + dice_loss(p1, y1)) / 2
    assert math.isclose(float(loss_fn(logits, target)), float(expected), rel_tol=1e-6)


def test_validation_dice_matches_hand_count():
    metric = DiceScore(num_classes=3, include_background=False, average="none", input_format="index")
    # case 1: label 1 has 4 reference voxels, 3 predicted, 2 overlap -> 2*2/(4+3); label 2 absent in both
    ref = torch.zeros(1, 4, 4, 1, dtype=torch.long)
    pred = torch.zeros_like(ref)
    ref[0, 0, :4] = 1
    pred[0, 0, 2:] = 1
    pred[0, 1, 0] = 1
    # case 2: label 2 perfect (2 voxels), label 1 absent in the reference but predicted once -> 0
    ref2 = torch.zeros_like(ref)
    pred2 = torch.zeros_like(ref)
    ref2[0, 3, :2] = 2
    pred2[0, 3, :2] = 2
    pred2[0, 0, 0] = 1
    metric.update(pred, ref)
    metric.update(pred2, ref2)
    label1, label2 = metric.compute().tolist()
    assert math.isclose(label1, (4 / 7 + 0.0) / 2, rel_tol=1e-6)  # empty reference + prediction scores 0
    assert math.isclose(label2, 1.0)  # case 1 (empty in both) is left out of label 2's mean
