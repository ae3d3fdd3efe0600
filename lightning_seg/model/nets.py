"""Network builders with a width knob; depth, strides and kernels follow the patch and the voxel spacing
as nnU-Net's planner derives them (nnunetv2 `get_pool_and_conv_props`): an anisotropic task (prostate:
0.625 x 0.625 x 3.6 mm) keeps its thick axis until the others have caught up with its spacing."""

import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

from monai.networks.nets import BasicUNet, DynUNet, UNet
from torch import nn

from lightning_seg.errors import ConfigError

log = logging.getLogger(__name__)


class Topology(NamedTuple):
    """Per-level strides (2 or 1 per axis) and kernel sizes (3 or 1), one more kernel: the bottleneck's."""

    strides: list[tuple[int, ...]]
    kernels: list[tuple[int, ...]]


def plan_topology(
    patch_size: Sequence[float],
    max_downsamplings: int,
    spacing: Sequence[float] | None = None,
    min_size: int = 4,
    padded: bool = False,
) -> Topology:
    """nnU-Net's rule (`spacing=None`: isotropic): an axis is halved while its feature map stays >= `min_size`
    voxels and its (current) spacing is within 2x of the finest valid axis' (a lone axis needs 3 * min_size);
    its kernel is 1 while its spacing is 2x the finest or more, else 3. An odd size stops an axis, so the
    network sees the configured patch (`padded=True`: nnU-Net's padding to multiples of 2^pools)."""
    size = [float(n) if padded else int(n) for n in patch_size]
    current = [1.0] * len(size) if spacing is None else [float(s) for s in spacing]
    if len(current) != len(size):
        raise ConfigError(f"model spacing {list(current)} and patch {size} have different dimensions")
    strides, kernels = [], []
    kernel = [1] * len(size)
    while len(strides) < max_downsamplings:
        room = [d for d, n in enumerate(size) if (padded or n % 2 == 0) and n / 2 >= min_size]
        if not room:
            break
        finest = min(current[d] for d in room)
        axes = [d for d in room if current[d] / finest < 2]
        if len(axes) == 1 and size[axes[0]] < 3 * min_size:
            break
        kernel = [3 if k == 3 or current[d] / min(current) < 2 else 1 for d, k in enumerate(kernel)]
        kernels.append(tuple(kernel))
        strides.append(tuple(2 if d in axes else 1 for d in range(len(size))))
        for d in axes:
            size[d] = size[d] / 2 if padded else size[d] // 2
            current[d] *= 2
    kernels.append((3,) * len(size))
    return Topology(strides, kernels)


def padded_patch(size: Sequence[float], max_downsamplings: int, spacing: Sequence[float]) -> list[int]:
    """The smallest patch holding `size` voxels that every planned down-sampling halves exactly."""
    strides = plan_topology(size, max_downsamplings, spacing, padded=True).strides
    divisors = [math.prod(s[d] for s in strides) for d in range(len(size))]
    return [math.ceil(n / d) * d for n, d in zip(size, divisors, strict=True)]


def basic_unet(in_channels: int, out_channels: int, patch_size: Sequence[int], width: int = 32) -> nn.Module:
    """Cicek et al. 2016 3D U-Net: two 3x3x3 convs per level, 4 fixed 2x down-samplings."""
    if any(n % 16 for n in patch_size):
        given = ",".join(str(n) for n in patch_size)
        fitting = ",".join(str(-(-n // 16) * 16) for n in patch_size)  # rounded up to multiples of 16
        raise ConfigError(
            f"task.patch_size=[{given}]: model=basic_unet down-samples 4 times, so every patch dimension "
            f"must be a multiple of 16; pick such a patch (e.g. task.patch_size=[{fitting}]) "
            "or model=monai_unet / model=dynunet, whose depth follows the patch"
        )
    features = (width, width, 2 * width, 4 * width, 8 * width, width)
    return BasicUNet(spatial_dims=3, in_channels=in_channels, out_channels=out_channels, features=features)


def monai_unet(
    in_channels: int,
    out_channels: int,
    patch_size: Sequence[int],
    width: int = 16,
    spacing: Sequence[float] | None = None,
) -> nn.Module:
    """MONAI's tutorial UNet (residual units, batch norm), up to 4 down-samplings planned from the
    spacing (MONAI's UNet has one kernel size, 3^3, for every level)."""
    strides = plan_topology(patch_size, max_downsamplings=4, spacing=spacing).strides
    channels = [width * 2**level for level in range(len(strides) + 1)]
    return UNet(3, in_channels, out_channels, channels, strides, num_res_units=2, norm="batch")


def dynunet(
    in_channels: int,
    out_channels: int,
    patch_size: Sequence[int],
    width: int = 32,
    max_features: int = 320,
    spacing: Sequence[float] | None = None,
    deep_supervision: bool = False,
) -> nn.Module:
    """nnU-Net's plain U-Net (instance norm), up to 5 down-samplings planned from the spacing. With
    `deep_supervision` (nnU-Net's loss on every decoder resolution but the lowest) training returns (batch,
    outputs, classes, *patch), full resolution first, the rest up-sampled (MONAI); eval: only the first."""
    strides, kernels = plan_topology(patch_size, max_downsamplings=5, spacing=spacing)
    filters = [min(width * 2**level, max_features) for level in range(len(strides) + 1)]
    # MONAI's heads sit at the decoder resolutions below the full one; nnU-Net gives its lowest decoder
    # output weight 0, so: one head fewer than the up-sampling layers below the full resolution
    heads = len(strides) - 2 if deep_supervision else 0
    if deep_supervision and heads < 1:
        log.warning(
            f"model.deep_supervision=true, but the patch {list(patch_size)} allows {len(strides)} "
            "down-sampling(s) and deep supervision needs 3: training without it"
        )
    shape = dict(kernel_size=kernels, strides=[1, *strides], upsample_kernel_size=strides, filters=filters)
    supervision = dict(deep_supervision=heads > 0, deep_supr_num=max(heads, 1))
    return DynUNet(3, in_channels, out_channels, norm_name="instance", **shape, **supervision)
