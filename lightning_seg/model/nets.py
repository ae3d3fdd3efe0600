"""Network builders with a width knob; depth follows the patch and the voxel spacing.

MONAI's constructors take explicit channel lists, strides and kernel sizes. These builders derive
them as nnU-Net's planner does (nnunetv2 `get_pool_and_conv_props`), so one `width` scales a network
for a CPU test or a GPU study, and an anisotropic task (prostate: 0.625 x 0.625 x 3.6 mm) keeps its
thick axis until the others have caught up with its spacing.
"""

import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

from monai.networks.nets import BasicUNet, DynUNet, UNet
from torch import nn

from lightning_seg.errors import ConfigError

log = logging.getLogger(__name__)


class Topology(NamedTuple):
    """Per-level strides (2 or 1 per axis) and per-level convolution kernel sizes (3 or 1 per axis),
    one more kernel than strides: the bottleneck's."""

    strides: list[tuple[int, ...]]
    kernels: list[tuple[int, ...]]


def plan_topology(
    patch_size: Sequence[float],
    max_downsamplings: int,
    spacing: Sequence[float] | None = None,
    min_size: int = 4,
    padded: bool = False,
) -> Topology:
    """nnU-Net's rule: an axis is down-sampled while its feature map stays at least `min_size` voxels
    and its (current) spacing is within 2x of the finest valid axis'; a lone axis needs 3 * min_size.
    A convolution kernel is 1 along an axis whose spacing is still 2x the finest or more, 3 once it
    is not. One difference: nnU-Net pads the patch to a multiple of 2^pools; here an odd size stops
    that axis, so the configured patch is what the network sees (`padded=True`: nnU-Net's way, for
    planning a patch that `padded_patch` then pads). `spacing=None`: isotropic."""
    size = [float(n) if padded else int(n) for n in patch_size]
    current = [1.0] * len(size) if spacing is None else [float(s) for s in spacing]
    if len(current) != len(size):
        raise ConfigError(f"model spacing {list(current)} and patch {size} have different dimensions")
    strides: list[tuple[int, ...]] = []
    kernels: list[tuple[int, ...]] = []
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
    """The smallest patch holding `size` voxels that every planned down-sampling halves exactly
    (nnU-Net pads its patch to a multiple of 2^pools per axis the same way)."""
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
    spacing (its 3^3 kernels are fixed: MONAI's UNet has one kernel size for every level)."""
    strides = plan_topology(patch_size, max_downsamplings=4, spacing=spacing).strides
    channels = [width * 2**level for level in range(len(strides) + 1)]
    return UNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        channels=channels,
        strides=strides,
        num_res_units=2,
        norm="batch",
    )


def dynunet(
    in_channels: int,
    out_channels: int,
    patch_size: Sequence[int],
    width: int = 32,
    max_features: int = 320,
    spacing: Sequence[float] | None = None,
    deep_supervision: bool = False,
) -> nn.Module:
    """nnU-Net's plain U-Net (instance norm), up to 5 down-samplings, strides and kernels planned from
    the spacing. `deep_supervision`: as nnU-Net, a loss on every decoder resolution but the lowest; in
    training the network then returns (batch, outputs, classes, *patch), the lower-resolution outputs
    up-sampled to the patch (MONAI), the full-resolution one first; in eval mode only that one."""
    topology = plan_topology(patch_size, max_downsamplings=5, spacing=spacing)
    strides = topology.strides
    filters = [min(width * 2**level, max_features) for level in range(len(strides) + 1)]
    # MONAI's heads sit at the decoder resolutions below the full one; nnU-Net gives its lowest decoder
    # output weight 0, so: one head fewer than the up-sampling layers below the full resolution
    heads = len(strides) - 2 if deep_supervision else 0
    if deep_supervision and heads < 1:
        log.warning(
            "model.deep_supervision=true, but the patch %s allows %d down-sampling(s) and deep "
            "supervision needs 3: training without it",
            list(patch_size),
            len(strides),
        )
    return DynUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=topology.kernels,
        strides=[1, *strides],
        upsample_kernel_size=strides,
        filters=filters,
        norm_name="instance",
        res_block=False,
        deep_supervision=heads > 0,
        deep_supr_num=max(heads, 1),
    )
