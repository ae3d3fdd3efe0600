"""Per-task preprocessing (deterministic, cached) and patch sampling (random, after the cache)."""

from collections.abc import Mapping, Sequence

import torch
from monai import transforms as T

KEYS = ("image", "label")


def normalization(cfg: Mapping) -> T.MapTransform:
    """Intensity normalization of the image from `task.normalization`."""
    kind = cfg["kind"]
    if kind == "zscore_nonzero":  # MRI: per case and channel, on the non-zero (head/body) voxels
        return T.NormalizeIntensityd("image", nonzero=True, channel_wise=True)
    if kind == "ct_window":  # CT: Hounsfield units are absolute, so one window fits every case
        return T.ScaleIntensityRanged(
            "image", a_min=cfg["a_min"], a_max=cfg["a_max"], b_min=0.0, b_max=1.0, clip=True
        )
    if kind == "percentile":
        return T.ScaleIntensityRangePercentilesd(
            "image",
            lower=cfg["lower"],
            upper=cfg["upper"],
            b_min=0.0,
            b_max=1.0,
            clip=True,
            channel_wise=True,
        )
    raise ValueError(f"unknown task.normalization.kind '{kind}' (zscore_nonzero, ct_window, percentile)")


def preprocessing(task: Mapping, keys: Sequence[str] = KEYS) -> list:
    """Load, channel first, reorient, resample to the task spacing, normalize."""
    modes = [("bilinear" if key == "image" else "nearest") for key in keys]
    return [
        T.LoadImaged(keys, image_only=True),
        T.EnsureChannelFirstd(keys),
        T.Orientationd(keys, axcodes=task["orientation"]),
        T.Spacingd(keys, pixdim=task["spacing"], mode=modes),
        T.EnsureTyped(keys, dtype=torch.float32),
        normalization(task["normalization"]),
    ]


def train_transforms(
    task: Mapping,
    samples_per_volume: int,
    pos_neg_ratio: Sequence[float],
    augment: bool,
    flip_axes: Sequence[int],
) -> T.Compose:
    """Cached preprocessing and padding, then foreground-aware random patches and augmentation."""
    patch = task["patch_size"]
    random = [
        T.RandCropByPosNegLabeld(
            KEYS,
            label_key="label",
            spatial_size=patch,
            pos=pos_neg_ratio[0],
            neg=pos_neg_ratio[1],
            num_samples=samples_per_volume,
        ),
    ]
    if augment:
        random += [T.RandFlipd(KEYS, prob=0.5, spatial_axis=axis) for axis in flip_axes]
        random += [
            T.RandScaleIntensityd("image", factors=0.1, prob=0.5),
            T.RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        ]
    # plain tensors from here on: MetaTensor bookkeeping costs time in every network op
    random.append(T.EnsureTyped(KEYS, dtype=torch.float32, track_meta=False))
    return T.Compose([*preprocessing(task), T.SpatialPadd(KEYS, spatial_size=patch), *random])


def val_transforms(task: Mapping) -> T.Compose:
    """Whole preprocessed volumes for sliding-window validation."""
    return T.Compose([*preprocessing(task), T.EnsureTyped(KEYS, track_meta=False)])
