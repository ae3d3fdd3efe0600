"""Network topology from patch and spacing (nnU-Net's planner rule) and deep supervision."""

import math

import pytest
import torch
from hydra.utils import instantiate
from monai.losses import DiceLoss

from lightning_seg.model.deep_supervision import output_weights, segmentation_loss
from lightning_seg.model.nets import plan_topology
from lightning_seg.training import train

from .conftest import compose_config, tiny_synthetic_overrides


def test_an_anisotropic_axis_is_down_sampled_once_the_others_reach_its_spacing():
    # prostate: 0.625 x 0.625 x 3.6 mm; z waits two levels (3.6 / 1.25 >= 2), then 3.6 / 2.5 < 2
    strides, kernels = plan_topology([128, 128, 16], 5, spacing=[0.625, 0.625, 3.6])
    assert strides[:3] == [(2, 2, 1), (2, 2, 1), (2, 2, 2)]
    assert kernels[:3] == [(3, 3, 1), (3, 3, 1), (3, 3, 3)]  # no 3-voxel kernel across 3.6 mm slices
    z_size = 16 // math.prod(s[2] for s in strides)
    assert z_size >= 4 and len(kernels) == len(strides) + 1


def test_an_isotropic_patch_halves_every_axis_while_it_can():
    assert plan_topology([40, 56, 40], 5).strides == [(2, 2, 2)] * 3  # 5 x 7 x 5 at the bottom
    assert plan_topology([128] * 3, 4, spacing=[1.5, 1.5, 2.0]) == ([(2, 2, 2)] * 4, [(3, 3, 3)] * 5)
    # a lone axis left to pool needs 3 x the minimum feature map (nnU-Net): 10 stops, 12 goes on
    assert plan_topology([4, 4, 10], 5).strides == []
    assert plan_topology([4, 4, 12], 5).strides == [(1, 1, 2)]


def test_every_task_network_follows_its_spacing(tmp_path):
    net = instantiate(compose_config(tmp_path, ["task=prostate", "model=dynunet", "model.width=4"]).model)
    assert tuple(net.input_block.conv1.conv.weight.shape[2:]) == (3, 3, 1)
    unet = instantiate(compose_config(tmp_path, ["task=prostate", "model=monai_unet", "model.width=4"]).model)
    first_down = unet.model[0].conv.unit0.conv  # MONAI UNet: the first residual unit's strided conv
    assert first_down.stride == (2, 2, 1)


def test_deep_supervision_weighs_the_full_resolution_most_and_trains(tmp_path):
    assert output_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    cfg = compose_config(
        tmp_path, [*tiny_synthetic_overrides(), "model=dynunet", "trainer.max_epochs=1", "data.batch_size=2"]
    )
    net = instantiate(cfg.model)
    image = torch.randn(2, 1, 32, 32, 32)
    target = torch.randint(0, 3, (2, 1, 32, 32, 32)).float()
    with torch.no_grad():
        outputs = net.train()(image)
    assert outputs.shape == (2, 2, 3, 32, 32, 32)  # 32 -> 16 -> 8 -> 4: three levels, one extra output
    dice = DiceLoss(to_onehot_y=True, softmax=True)
    expected = 2 / 3 * dice(outputs[:, 0], target) + 1 / 3 * dice(outputs[:, 1], target)
    assert float(segmentation_loss(dice, outputs, target)) == pytest.approx(float(expected))
    with torch.no_grad():
        assert net.eval()(image).shape == (2, 3, 32, 32, 32)  # sliding windows see one output

    metrics, _ = train(cfg)
    assert math.isfinite(metrics["train/loss_epoch"]) and 0.0 <= metrics["val/dice"] <= 1.0


def test_brain_tumour_is_scored_by_its_regions(tmp_path):
    module = instantiate(compose_config(tmp_path, ["task=brain_tumour", "model.width=4"]).module)
    assert module.structures == {"whole_tumour": [1, 2, 3], "tumour_core": [2, 3], "enhancing_tumour": [3]}
    cfg = compose_config(
        tmp_path, ["task=brain_tumour", "model.width=4", "task.regions.enhancing_tumour=[4]"]
    )
    # Hydra wraps the ConfigError; the entry points print its message alone (lightning_seg.entry)
    with pytest.raises(Exception, match=r"'enhancing_tumour' unites \[4\]; a region needs .* values 1\.\.3"):
        instantiate(cfg.module)
