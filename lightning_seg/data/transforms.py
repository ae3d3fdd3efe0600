"""Per-task preprocessing (deterministic, written once to the store) and what each random patch gets."""

from collections.abc import Mapping, Sequence

import torch
from monai import transforms as T

KEYS = ("image", "label")
NORMALIZATIONS = ("zscore_nonzero", "zscore", "ct_window", "ct_zscore", "percentile")


def normalization(cfg: Mapping) -> T.MapTransform | T.Compose:
    kind = cfg["kind"]
    if kind in ("zscore_nonzero", "zscore"):  # MRI: per case and channel (nonzero: the head/body voxels)
        return T.NormalizeIntensityd("image", nonzero=kind == "zscore_nonzero", channel_wise=True)
    if kind == "ct_window":  # CT: Hounsfield units are absolute, so one window fits every case
        return T.ScaleIntensityRanged("image", cfg["a_min"], cfg["a_max"], b_min=0.0, b_max=1.0, clip=True)
    if kind == "ct_zscore":  # nnU-Net's CTNormalization: clip to the window, z-score by dataset statistics
        low, high = cfg["a_min"], cfg["a_max"]
        # an identity map with clip=True: MONAI's one clip to fixed values
        clip = T.ScaleIntensityRanged("image", a_min=low, a_max=high, b_min=low, b_max=high, clip=True)
        return T.Compose([clip, T.NormalizeIntensityd("image", subtrahend=cfg["mean"], divisor=cfg["std"])])
    if kind == "percentile":
        return T.ScaleIntensityRangePercentilesd(
            "image", cfg["lower"], cfg["upper"], b_min=0.0, b_max=1.0, clip=True, channel_wise=True
        )
    raise ValueError(f"unknown task.normalization.kind '{kind}' ({', '.join(NORMALIZATIONS)})")


def nonzero(x: torch.Tensor) -> torch.Tensor:
    """Foreground of an MRI with a zero background (module level: the transform is pickled)."""
    return x != 0


def resampling(task: Mapping, keys: Sequence[str] = KEYS) -> list:
    """Load, channel first, reorient, resample to the task spacing, as float32."""
    modes = [("bilinear" if key == "image" else "nearest") for key in keys]
    return [
        T.LoadImaged(keys, image_only=True),
        T.EnsureChannelFirstd(keys),
        # labels=None: the axis labels follow the image's "space" (RAS for NIfTI, the labels MONAI used
        # before), MONAI's coming default, chosen now so its deprecation warning does not reach the log
        T.Orientationd(keys, axcodes=task["orientation"], labels=None),
        T.Spacingd(keys, pixdim=task["spacing"], mode=modes),
        T.EnsureTyped(keys, dtype=torch.float32),
    ]


def preprocessing(task: Mapping, keys: Sequence[str] = KEYS) -> list:
    """A whole volume as training's store holds it: resampled, then normalized."""
    return [*resampling(task, keys), normalization(task["normalization"])]


def class_ratios(pos_neg_ratio: Sequence[float], num_classes: int) -> list[float]:
    """Patch-centre odds per label value: the background gets `neg`, the foreground classes share `pos`."""
    pos, neg = pos_neg_ratio
    return [neg] + [pos / (num_classes - 1)] * (num_classes - 1)


def patch_transforms(
    augment: bool, flip_axes: Sequence[int], augmentation: Sequence[T.MapTransform] = ()
) -> T.Compose:
    """What each random patch goes through: the recipe's `augmentation`, then with `augment` mirroring and
    intensity jitter; plain tensors out (MetaTensor bookkeeping costs time in every random transform)."""
    random = [T.EnsureTyped(KEYS, dtype=torch.float32, track_meta=False), *augmentation]
    if augment:
        random += [T.RandFlipd(KEYS, prob=0.5, spatial_axis=axis) for axis in flip_axes]
        random.append(T.RandScaleIntensityd("image", factors=0.1, prob=0.5))
        random.append(T.RandShiftIntensityd("image", offsets=0.1, prob=0.5))
    # MONAI's random transforms wrap their output in a MetaTensor again
    random.append(T.EnsureTyped(KEYS, dtype=torch.float32, track_meta=False))
    return T.Compose(random)
