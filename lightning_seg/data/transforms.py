"""Per-task preprocessing (deterministic, cached) and patch sampling (random, after the cache)."""

from collections.abc import Mapping, Sequence

import torch
from monai import transforms as T

KEYS = ("image", "label")
CROP_CENTRES = "label_cls_indices"  # ClassesToIndicesd's output key for "label"
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


def preprocessing(task: Mapping, keys: Sequence[str] = KEYS, crop_foreground: bool = False) -> list:
    """Load, channel first, reorient, resample to the task spacing, optionally crop to the image's
    non-zero box, normalize."""
    modes = [("bilinear" if key == "image" else "nearest") for key in keys]
    steps = [
        T.LoadImaged(keys, image_only=True),
        T.EnsureChannelFirstd(keys),
        # labels=None: the axis labels follow the image's "space" (RAS for NIfTI, the labels MONAI used
        # before), MONAI's coming default, chosen now so its deprecation warning does not reach the log
        T.Orientationd(keys, axcodes=task["orientation"], labels=None),
        T.Spacingd(keys, pixdim=task["spacing"], mode=modes),
    ]
    if crop_foreground:  # before normalization: z-scoring turns the zero background negative
        no_box = {"start_coord_key": None, "end_coord_key": None}  # box coordinates would reach the batch
        steps.append(
            T.CropForegroundd(keys, source_key="image", select_fn=nonzero, allow_smaller=True, **no_box)
        )
    return [*steps, T.EnsureTyped(keys, dtype=torch.float32), normalization(task["normalization"])]


def class_ratios(pos_neg_ratio: Sequence[float], num_classes: int) -> list[float]:
    """Patch-centre odds per label value: the background gets `neg`, the foreground classes share `pos`."""
    pos, neg = pos_neg_ratio
    return [neg] + [pos / (num_classes - 1)] * (num_classes - 1)


def train_transforms(
    task: Mapping,
    samples_per_volume: int,
    pos_neg_ratio: Sequence[float],
    augment: bool,
    flip_axes: Sequence[int],
    crop_centres_per_class: int,
    device: torch.device | None = None,
    augmentation: Sequence[T.MapTransform] = (),
) -> T.Compose:
    """Cached preprocessing, padding and patch-centre candidates (on `device`), then class-aware random
    patches, the recipe's `augmentation` on each, and with `augment` mirroring and intensity jitter."""
    patch, num_classes = task["patch_size"], len(task["labels"])
    cached = [
        *preprocessing(task, crop_foreground=task["crop_foreground"]),
        T.SpatialPadd(KEYS, spatial_size=patch),
        # at most this many voxels per class, evenly spread: a full index array costs 8 bytes per
        # voxel (2-3x a large CT volume); nnU-Net likewise keeps at most 10000 locations per class
        T.ClassesToIndicesd("label", num_classes=num_classes, max_samples_per_class=crop_centres_per_class),
        # plain tensors from here on: MetaTensor bookkeeping costs time in every random transform
        T.EnsureTyped(KEYS, dtype=torch.float32, device=device, track_meta=False),
    ]
    # pops the centre candidates, so they never reach the batch; no image_key: after z-scoring tissue
    # can be negative. A class absent from a case (a tumour-free one) gets ratio 0, its share going to
    # the others, as expected: hence warn=False
    crop = T.RandCropByLabelClassesd(
        KEYS,
        label_key="label",
        spatial_size=patch,
        ratios=class_ratios(pos_neg_ratio, num_classes),
        num_classes=num_classes,
        num_samples=samples_per_volume,
        indices_key=CROP_CENTRES,
        warn=False,
    )
    random = [crop, *augmentation]
    if augment:
        random += [T.RandFlipd(KEYS, prob=0.5, spatial_axis=axis) for axis in flip_axes]
        random.append(T.RandScaleIntensityd("image", factors=0.1, prob=0.5))
        random.append(T.RandShiftIntensityd("image", offsets=0.1, prob=0.5))
    # MONAI's random transforms wrap their output in a MetaTensor again
    random.append(T.EnsureTyped(KEYS, dtype=torch.float32, track_meta=False))
    return T.Compose([*cached, *random])


def val_transforms(task: Mapping) -> T.Compose:
    """Whole preprocessed volumes for sliding-window validation."""
    return T.Compose([*preprocessing(task), T.EnsureTyped(KEYS, track_meta=False)])
