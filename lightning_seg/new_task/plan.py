"""A task config planned from a dataset's fingerprint, decision by decision.

The rules are nnU-Net v2's default planner's (`ExperimentPlanner`: target spacing, normalization,
cropping, topology, a patch padded to its down-samplings), written here for this project's config.
Where it differs: the patch and batch are sized by the memory planner (lightning_seg.study.memory)
for the card and precision the user names (nnU-Net assumes an 8 GB card and fp16 AMP), and a CPU
plan (`gpu=cpu`) picks the small network and whole-case patch that reach a good Dice fastest on a
CPU, as the hand-written hippocampus config does.
"""

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from lightning_seg.config import CONFIG_DIR
from lightning_seg.data.layout import DatasetError
from lightning_seg.model.nets import padded_patch, plan_topology
from lightning_seg.precision import label
from lightning_seg.study.memory.fit import MARGIN, card_budget, largest_batch
from lightning_seg.study.memory.step import GIB, train_step_memory

ANISOTROPY = 3  # nnU-Net: an axis this much coarser than the others and this much shorter is "thick"
ANISOTROPIC_PERCENTILE = 10  # its target spacing: this percentile of its spacings instead of the median
MASK_BELOW = 0.75  # nnU-Net: z-score on the non-zero voxels when they hold under 3/4 of the median image
BATCH_SHARE = 0.05  # nnU-Net: one batch holds at most 5% of the dataset's voxels (GPU plans)
SPREAD_NOTE = 3  # spacing that varies more than this between cases is named in the plan
# CPU plans: MONAI's UNet on a whole-case patch trained hippocampus fastest to Dice 0.85 on 2 cores
# (docs/results/hippocampus_cpu.md: 40x56x40, batch 8). A patch holds at most twice that case, a step
# about as many voxels as that batch of 8.
CPU_MODEL, CPU_DOWNSAMPLINGS = "monai_unet", 4
CPU_PATCH_VOXELS = 2 * 40 * 56 * 40
CPU_STEP_VOXELS = 8 * 40 * 56 * 40
CPU_MAX_BATCH = 8
GPU_MODEL, GPU_DOWNSAMPLINGS = "dynunet", 5  # nnU-Net's plain U-Net
VAL_EVERY_STEPS = 100  # validate about this often (in training steps), in whole epochs
DICE_THRESHOLDS = [0.5, 0.7, 0.8, 0.85, 0.9]
# mirroring an axis along which two labels keep their order in this share of the cases (at least
# ORDER_MIN_CASES of them) would train on label maps that never occur: that axis is not mirrored
ORDER_SHARE, ORDER_MIN_CASES = 0.95, 5
AXES = (
    "LR",
    "PA",
    "IS",
)  # RAS: the axes training resamples in  # time-to-accuracy targets, foreground mean val/dice
# data settings the plan assumes (conf/data/msd.yaml's defaults)
SAMPLES_PER_VOLUME, VAL_FRACTION = 2, 0.2


@dataclass
class Decision:
    key: str
    value: Any
    why: str


@dataclass
class Target:
    """What the plan is for: a card's memory and a precision, or a CPU (`capacity_gib=None`)."""

    name: str
    capacity_gib: float | None
    precision: str | None

    @property
    def cpu(self) -> bool:
        return self.capacity_gib is None


@dataclass
class TaskPlan:
    name: str
    folder: str
    target: Target
    model: str
    batch_size: int
    flip_axes: list[int]
    task: dict
    decisions: list[Decision] = field(default_factory=list)


def plan_task(
    name: str, folder: str, fingerprint: dict, labels, regions, channels, target: Target
) -> TaskPlan:
    """Every decision of the plan, each with the numbers behind it."""
    decisions: list[Decision] = []

    def decide(key: str, value, why: str):
        decisions.append(Decision(key, value, why))
        return value

    cases = fingerprint["cases"]
    n = len(cases)
    spacing = decide("task.spacing", *target_spacing(fingerprint))
    spread = np.array(fingerprint["spacing_max"]) / np.array(fingerprint["spacing_min"])
    if spread.max() > SPREAD_NOTE:
        axis = int(spread.argmax())
        low, high = fingerprint["spacing_min"][axis], fingerprint["spacing_max"][axis]
        decisions.append(
            Decision(
                "(spacing spread)",
                f"axis {axis}: {low:.3g}-{high:.3g} mm",
                f"{spread[axis]:.1f}x between cases; every case is resampled to {spacing[axis]:.4g} mm",
            )
        )
    norm, crop, why_crop = normalization(fingerprint, channels)
    decide("task.normalization", norm, norm.pop("why"))
    decide("task.crop_foreground", crop, why_crop)
    decide("task.labels", labels, f"dataset.json: {len(labels)} label values")
    if regions:
        decide(
            "task.regions", regions, "dataset.json declares regions (lists of label values): scored as such"
        )
    decide("task.in_channels", len(channels), f"dataset.json: channels {channels}")

    shape_key = "shape_after_nonzero_crop" if crop else "shape"
    median = np.median([resampled(c[shape_key], c["spacing"], spacing) for c in cases], axis=0).tolist()
    n_train = 1 if n == 1 else n - max(1, round(VAL_FRACTION * n))
    feed = n_train * SAMPLES_PER_VOLUME  # patches per step the training cases can give (datamodule rule)
    task = {
        "name": name,
        "msd_folder": folder,
        "modality": "CT" if "ct" in [c.casefold() for c in channels] else "+".join(channels),
        "in_channels": len(channels),
        "labels": labels,
        "regions": regions,
        "normalization": norm,
        "spacing": spacing,
        "crop_foreground": crop,
    }
    if target.cpu:
        model, downsamplings = CPU_MODEL, CPU_DOWNSAMPLINGS
        scale = min(1.0, (CPU_PATCH_VOXELS / math.prod(median)) ** (1 / 3))
        patch = padded_patch([m * scale for m in median], downsamplings, spacing)
        why_patch = (
            f"the median image at target spacing, {fmt(median)} voxels"
            + (f", scaled by {scale:.2f} to the CPU's {CPU_PATCH_VOXELS} voxels" if scale < 1 else "")
            + ", padded to its down-samplings"
        )
        by_voxels = max(2, min(CPU_MAX_BATCH, CPU_STEP_VOXELS // math.prod(patch)))
        batch = even(min(by_voxels, feed))
        why_batch = (
            f"{by_voxels} patches make the CPU's {CPU_STEP_VOXELS}-voxel step (at most {CPU_MAX_BATCH}); "
            f"the {n_train} training cases feed {feed}"
        )
    else:
        model, downsamplings = GPU_MODEL, GPU_DOWNSAMPLINGS
        cfg = planning_config(task, model, target.precision)
        budget = card_budget(target.capacity_gib)
        patch, why_patch = gpu_patch(cfg, median, spacing, budget, target)
        fits, _ = largest_batch(cfg, int(budget / (1 - MARGIN)), MARGIN, target.precision, patch)
        share = round(BATCH_SHARE * n * math.prod(median) / math.prod(patch))
        batch = even(max(2, min(fits, feed, share)))
        why_batch = (
            f"{fits} fit {target.name} in {label(target.precision)} at this patch; the {n_train} training "
            f"cases feed {feed}; {share} hold 5% of the dataset's voxels (nnU-Net's cap); 2 at least"
        )
    flips, why_flips = mirror_axes(cases)
    decide("data.flip_axes", flips, why_flips)
    task["patch_size"] = decide("task.patch_size", patch, why_patch)
    strides = plan_topology(patch, downsamplings, spacing).strides
    decide(
        "model",
        model,
        f"{len(strides)} down-samplings, strides {[list(s) for s in strides]}: planned from the spacing"
        + (" (MONAI's UNet: fastest to Dice on a CPU)" if target.cpu else " (nnU-Net's plain U-Net)"),
    )
    decide("data.batch_size", batch, why_batch)
    steps = max(1, math.ceil(n_train / (batch // SAMPLES_PER_VOLUME)))
    every = decide(
        "task.val_every_n_epochs",
        max(1, round(VAL_EVERY_STEPS / steps)),
        f"an epoch is {steps} steps: validation about every {VAL_EVERY_STEPS} steps",
    )
    task["val_every_n_epochs"] = every
    task["dice_thresholds"] = decide("task.dice_thresholds", DICE_THRESHOLDS, "defaults: edit them")
    if n == 1:
        decisions.append(Decision("(split)", "1 case", "it trains and validates on that case: add cases"))
    return TaskPlan(name, folder, target, model, batch, flips, task, decisions)


def target_spacing(fingerprint: dict) -> tuple[list[float], str]:
    """nnU-Net's fullres spacing: the median; a thick axis (over 3x the others' spacing and under a
    third of their size in voxels) takes its 10th-percentile spacing, but no finer than the others'."""
    spacings = np.array([c["spacing"] for c in fingerprint["cases"]])
    sizes = np.median([c["shape_after_nonzero_crop"] for c in fingerprint["cases"]], axis=0)
    target = np.median(spacings, axis=0)
    worst = int(target.argmax())
    others = [d for d in range(3) if d != worst]
    why = f"the median of {len(spacings)} case(s)' spacings"
    coarse = target[worst] > ANISOTROPY * max(target[others])
    if coarse and sizes[worst] * ANISOTROPY < min(sizes[others]):
        thick = float(np.percentile(spacings[:, worst], ANISOTROPIC_PERCENTILE))
        if thick < max(target[others]):
            thick = max(max(target[others]), thick) + 1e-5
        ratio = target[worst] / max(target[others])
        why += (
            f"; axis {worst} is thick ({target[worst]:.3g} mm, {ratio:.1f}x the others, {sizes[worst]:.0f} "
            f"voxels against {min(sizes[others]):.0f}): its {ANISOTROPIC_PERCENTILE}th percentile, "
            f"{thick:.4g} mm"
        )
        target[worst] = thick
    return [round(float(t), 6) for t in target], why


def mirror_axes(cases: list[dict]) -> tuple[list[int], str]:
    """The axes random mirroring may flip: all, but those along which two labels keep their order
    (hippocampus: anterior before posterior; left and right kidneys along LR). nnU-Net mirrors every
    axis; a mirrored image whose labels sit the wrong way round teaches the network to ignore where
    a structure lies."""
    labels = sorted({v for c in cases for v in c["label_centroids_mm"]}, key=int)
    orders = {axis: ordered_pair(cases, labels, axis) for axis in range(3)}
    kept = [axis for axis, order in orders.items() if order is None]
    reasons = [order for order in orders.values() if order]
    if not reasons:
        return kept, "every axis: no two labels keep their order along one"
    return kept, "; ".join(reasons) + ": mirroring there would swap them"


def ordered_pair(cases: list[dict], labels: list[str], axis: int) -> str | None:
    """Two labels whose centres keep their order along `axis`, said in words, or None."""
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            both = [c["label_centroids_mm"] for c in cases if {a, b} <= c["label_centroids_mm"].keys()]
            before = sum(c[a][axis] < c[b][axis] for c in both)
            share = max(before, len(both) - before) / max(len(both), 1)
            if len(both) >= ORDER_MIN_CASES and share >= ORDER_SHARE:
                return (
                    f"labels {a}, {b} keep their order along {AXES[axis]} in {share:.0%} of {len(both)} cases"
                )
    return None


def normalization(fingerprint: dict, channels: list[str]) -> tuple[dict, bool, str]:
    """(task.normalization with a "why", task.crop_foreground, why): nnU-Net's scheme per channel name."""
    relative = fingerprint["median_relative_size_after_crop"]
    if any(c.casefold() == "ct" for c in channels):
        if len(channels) > 1:
            raise DatasetError(
                f"channels {channels}: CT planned with other channels is not supported; plan the task "
                "and set task.normalization by hand (kind: zscore for every channel)"
            )
        stats = fingerprint["foreground_intensities"][0]
        low, high, mean, std = (stats[k] for k in ("percentile_00_5", "percentile_99_5", "mean", "std"))
        norm = {"kind": "ct_zscore", "a_min": low, "a_max": high, "mean": mean, "std": max(std, 1e-8)}
        norm["why"] = (
            f"channel CT: clip to the foreground's 0.5-99.5 percentiles [{low:.4g}, {high:.4g}], z-score "
            f"with its mean {mean:.4g} and std {std:.4g} (all training cases)"
        )
        return norm, False, "CT: the background is air, not zero"
    masked = relative < MASK_BELOW
    share = f"the non-zero box holds {relative:.0%} of the median image"
    norm = {
        "kind": "zscore_nonzero" if masked else "zscore",
        "why": f"channels {channels}: z-score per case and channel, "
        + (f"on the non-zero voxels ({share}, < 75%)" if masked else f"on every voxel ({share}, >= 75%)"),
    }
    return norm, masked, share + (": crop to it" if masked else ": no crop")


def gpu_patch(cfg: DictConfig, median, spacing, budget: int, target: Target) -> tuple[list[int], str]:
    """The largest patch of the median image's aspect whose batch-2 step fits `budget` bytes."""

    def patch_at(scale: float) -> list[int]:
        return padded_patch([max(1.0, m * scale) for m in median], GPU_DOWNSAMPLINGS, spacing)

    def fits(patch: list[int]) -> bool:
        try:
            step = train_step_memory(cfg, batch=2, patch=patch, precision=target.precision)
        except InstantiationException:  # a patch too small for the network's least depth
            return False
        return step.peak_bytes <= budget

    card = f"{target.name} ({budget / GIB:.1f} GiB usable) in {label(target.precision)}"
    whole = patch_at(1.0)
    if fits(whole):
        return whole, f"the median image at target spacing, {fmt(median)} voxels, padded; batch 2 fits {card}"
    low, high = 0.0, 1.0
    for _ in range(8):  # bisection over the scale: the peak grows with the patch
        mid = (low + high) / 2
        low, high = (mid, high) if fits(patch_at(mid)) else (low, mid)
    if low == 0.0:
        raise DatasetError(f"no patch of the median image's aspect fits batch 2 on {card}")
    return patch_at(
        low
    ), f"{low:.2f} x the median image {fmt(median)} (its aspect): the largest whose batch 2 fits {card}"


def planning_config(task: dict, model: str, precision: str) -> DictConfig:
    """The training config of the planned task, for the memory planner."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["task=synthetic", f"model={model}", f"precision={precision}"])
    OmegaConf.update(cfg, "task.synthetic", None, merge=False)
    for key, value in task.items():  # normalization is a typed node: merged into, not replaced
        OmegaConf.update(cfg, f"task.{key}", value, merge=key == "normalization")
    OmegaConf.update(cfg, "task.patch_size", [32, 32, 32], merge=False)  # replaced at every point
    return cfg


def resampled(shape, spacing, target) -> list[int]:
    """Voxels per axis at the target spacing, rounded as nnU-Net and MONAI's resampling round them
    (headers store spacing in float32: 0.8 mm reads 0.80000001)."""
    return [round(n * s / t) for n, s, t in zip(shape, spacing, target, strict=True)]


def even(batch: int) -> int:
    """A batch of whole volumes (data.samples_per_volume patches each), at least one volume."""
    return max(SAMPLES_PER_VOLUME, batch - batch % SAMPLES_PER_VOLUME)


def fmt(values) -> str:
    return "x".join(f"{v:.0f}" for v in values)
