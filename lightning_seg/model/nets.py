"""Network builders with a width knob; depth follows the patch size.

MONAI's constructors take explicit channel lists and strides. These builders derive them,
nnU-Net style, from the patch (down-sample a dimension only while it stays even and at
least 4 voxels), so one `width` scales a network for a CPU test or a GPU study.
"""

from collections.abc import Sequence

from monai.networks.nets import BasicUNet, DynUNet, UNet
from torch import nn

from lightning_seg.errors import ConfigError


def pooling_strides(patch_size: Sequence[int], max_downsamplings: int, min_size: int = 4) -> list[tuple]:
    """Per-level strides (2 or 1 per dimension) that the patch allows."""
    size, strides = list(patch_size), []
    for _ in range(max_downsamplings):
        stride = tuple(2 if n % 2 == 0 and n // 2 >= min_size else 1 for n in size)
        if stride == (1,) * len(size):
            break
        strides.append(stride)
        size = [n // s for n, s in zip(size, stride, strict=True)]
    return strides


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


def monai_unet(in_channels: int, out_channels: int, patch_size: Sequence[int], width: int = 16) -> nn.Module:
    """MONAI's tutorial UNet (residual units, batch norm), up to 4 down-samplings."""
    strides = pooling_strides(patch_size, max_downsamplings=4)
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
    in_channels: int, out_channels: int, patch_size: Sequence[int], width: int = 32, max_features: int = 320
) -> nn.Module:
    """nnU-Net's plain U-Net (instance norm, no deep supervision), up to 5 down-samplings."""
    strides = pooling_strides(patch_size, max_downsamplings=5)
    filters = [min(width * 2**level, max_features) for level in range(len(strides) + 1)]
    return DynUNet(
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        kernel_size=[3] * (len(strides) + 1),
        strides=[1, *strides],
        upsample_kernel_size=strides,
        filters=filters,
        norm_name="instance",
        res_block=False,
    )
