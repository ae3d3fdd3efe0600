"""A task config planned from a dataset's fingerprint by nnU-Net v2's default ExperimentPlanner rules
(README's table), but the memory planner sizes patch and batch for the user's card and precision (nnU-Net
assumes 8 GB, fp16 AMP), and a CPU plan (`gpu=cpu`) takes the net and patch fastest to Dice on a CPU."""

import itertools
import math
from collections import namedtuple

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
# CPU plans: MONAI's UNet on a whole case trained hippocampus fastest to Dice 0.85 on 2 cores (40x56x40,
# batch 8: docs/results/hippocampus_cpu.md); a patch holds at most twice that case, a step that batch's voxels
CPU_MODEL, CPU_DOWNSAMPLINGS = "monai_unet", 4
CPU_PATCH_VOXELS, CPU_STEP_VOXELS, CPU_MAX_BATCH = 2 * 40 * 56 * 40, 8 * 40 * 56 * 40, 8
GPU_MODEL, GPU_DOWNSAMPLINGS = "dynunet", 5  # nnU-Net's plain U-Net
VAL_EVERY_STEPS = 100  # validate about this often (in training steps), in whole epochs
DICE_THRESHOLDS = [0.5, 0.7, 0.8, 0.85, 0.9]  # time-to-accuracy targets, foreground mean val/dice
ORDER_SHARE, ORDER_MIN_CASES = 0.95, 5  # "keep their order": in 95% of the cases, 5 cases at least
AXES = ("LR", "PA", "IS")  # RAS: the axes training resamples in
SAMPLES_PER_VOLUME, VAL_FRACTION = 2, 0.2  # the data settings the plan assumes (conf/data/msd.yaml's)
Decision = namedtuple("Decision", "key value why")  # a planned value and the numbers behind it
Target = namedtuple("Target", "name capacity_gib precision")  # a card's GiB and a precision; a CPU: GiB None
Sizing = namedtuple("Sizing", "model downsamplings net patch why_patch batch why_batch")


def plan_task(name, folder, fingerprint: dict, labels, regions, channels, target: Target):
    """The task group's keys (name and msd_folder too) and every decision, each with the numbers behind it."""
    decisions: list[Decision] = []

    def decide(key: str, value, why: str):
        decisions.append(Decision(key, value, why))
        return value

    cases = fingerprint["cases"]
    n = len(cases)
    spacing = decide("task.spacing", *target_spacing(fingerprint))
    if spread := spacing_spread(fingerprint, spacing):
        decisions.append(spread)
    norm, why_norm, crop, why_crop = normalization(fingerprint, channels)
    decide("task.normalization", norm, why_norm)
    decide("task.crop_foreground", crop, why_crop)
    decide("task.labels", labels, f"dataset.json: {len(labels)} label values")
    if regions:
        decide(
            "task.regions", regions, "dataset.json declares regions (lists of label values): scored as such"
        )
    decide("task.in_channels", len(channels), f"dataset.json: channels {channels}")

    shape_key = "shape_after_nonzero_crop" if crop else "shape"
    # voxels at the target spacing, rounded as nnU-Net and MONAI's resampling round them (headers store
    # spacing in float32: 0.8 mm reads 0.80000001)
    sizes = [np.rint(np.multiply(c[shape_key], c["spacing"]) / spacing) for c in cases]
    median = np.median(sizes, axis=0).tolist()
    n_train = 1 if n == 1 else n - max(1, round(VAL_FRACTION * n))
    feed = n_train * SAMPLES_PER_VOLUME  # patches a step the training cases give (the datamodule's rule)
    modality = "CT" if "ct" in [c.casefold() for c in channels] else "+".join(channels)
    task = dict(name=name, msd_folder=folder, modality=modality, in_channels=len(channels), labels=labels)
    task.update(regions=regions, normalization=norm, spacing=spacing, crop_foreground=crop)
    sized = (
        cpu_sizing(median, spacing, n_train, feed)
        if target.capacity_gib is None
        else gpu_sizing(task, median, spacing, n, n_train, feed, target)
    )
    model, downsamplings, net, patch, why_patch, batch, why_batch = sized
    decide("data.flip_axes", *mirror_axes(cases))
    task["patch_size"] = decide("task.patch_size", patch, why_patch)
    strides = [list(s) for s in plan_topology(patch, downsamplings, spacing).strides]
    why_model = f"{len(strides)} down-samplings, strides {strides}: planned from the spacing ({net})"
    decide("model", model, why_model)
    decide("data.batch_size", batch, why_batch)
    task["val_every_n_epochs"] = decide("task.val_every_n_epochs", *validation_interval(n_train, batch))
    task["dice_thresholds"] = decide("task.dice_thresholds", DICE_THRESHOLDS, "defaults: edit them")
    if n == 1:
        decide("(split)", "1 case", "it trains and validates on that case: add cases")
    return task, decisions


def spacing_spread(fingerprint: dict, spacing: list[float]) -> Decision | None:
    """A note where the cases' spacing varies more than SPREAD_NOTE times along an axis."""
    low, high = np.array(fingerprint["spacing_min"]), np.array(fingerprint["spacing_max"])
    if (high / low).max() <= SPREAD_NOTE:
        return None
    axis = int((high / low).argmax())
    return Decision(
        "(spacing spread)",
        f"axis {axis}: {low[axis]:.3g}-{high[axis]:.3g} mm",
        f"{high[axis] / low[axis]:.1f}x between cases; every case is resampled to {spacing[axis]:.4g} mm",
    )


def validation_interval(n_train: int, batch: int) -> tuple[int, str]:
    """Whole epochs between validations: about every VAL_EVERY_STEPS training steps."""
    steps = max(1, math.ceil(n_train / (batch // SAMPLES_PER_VOLUME)))
    why = f"an epoch is {steps} steps: validation about every {VAL_EVERY_STEPS} steps"
    return max(1, round(VAL_EVERY_STEPS / steps)), why


def cpu_sizing(median: list[float], spacing: list[float], n_train: int, feed: int) -> Sizing:
    """MONAI's UNet, the median image scaled to the CPU's patch voxels, the batch that makes a CPU step."""
    scale = min(1.0, (CPU_PATCH_VOXELS / math.prod(median)) ** (1 / 3))
    patch = padded_patch([m * scale for m in median], CPU_DOWNSAMPLINGS, spacing)
    scaled = f", scaled by {scale:.2f} to the CPU's {CPU_PATCH_VOXELS} voxels" if scale < 1 else ""
    why_patch = (
        f"the median image at target spacing, {fmt(median)} voxels{scaled}, padded to its down-samplings"
    )
    by_voxels = max(2, min(CPU_MAX_BATCH, CPU_STEP_VOXELS // math.prod(patch)))
    why_batch = (
        f"{by_voxels} patches make the CPU's {CPU_STEP_VOXELS}-voxel step (at most {CPU_MAX_BATCH}); "
        f"the {n_train} training cases feed {feed}"
    )
    net = "MONAI's UNet: fastest to Dice on a CPU"
    return Sizing(CPU_MODEL, CPU_DOWNSAMPLINGS, net, patch, why_patch, even(min(by_voxels, feed)), why_batch)


def gpu_sizing(task: dict, median: list, spacing: list, n: int, n_train: int, feed: int, target) -> Sizing:
    """nnU-Net's plain U-Net, patch and batch sized by the memory planner for the card and precision."""
    cfg = planning_config(task, GPU_MODEL, target.precision)
    budget = card_budget(target.capacity_gib)
    patch, why_patch = gpu_patch(cfg, median, spacing, budget, target)
    fits, _ = largest_batch(cfg, int(budget / (1 - MARGIN)), MARGIN, target.precision, patch)
    share = round(BATCH_SHARE * n * math.prod(median) / math.prod(patch))
    why_batch = (
        f"{fits} fit {target.name} in {label(target.precision)} at this patch; the {n_train} training "
        f"cases feed {feed}; {share} hold 5% of the dataset's voxels (nnU-Net's cap); 2 at least"
    )
    batch = even(max(2, min(fits, feed, share)))
    return Sizing(GPU_MODEL, GPU_DOWNSAMPLINGS, "nnU-Net's plain U-Net", patch, why_patch, batch, why_batch)


def target_spacing(fingerprint: dict) -> tuple[list[float], str]:
    """nnU-Net's fullres spacing: the median; a thick axis (ANISOTROPY) takes its 10th-percentile spacing,
    but no finer than the others'."""
    spacings = np.array([c["spacing"] for c in fingerprint["cases"]])
    sizes = np.median([c["shape_after_nonzero_crop"] for c in fingerprint["cases"]], axis=0)
    target = np.median(spacings, axis=0)
    worst = int(target.argmax())
    other, other_size = np.delete(target, worst).max(), np.delete(sizes, worst).min()
    why = f"the median of {len(spacings)} case(s)' spacings"
    if target[worst] > ANISOTROPY * other and sizes[worst] * ANISOTROPY < other_size:
        thick = float(np.percentile(spacings[:, worst], ANISOTROPIC_PERCENTILE))
        thick = thick if thick >= other else other + 1e-5
        why += (
            f"; axis {worst} is thick ({target[worst]:.3g} mm, {target[worst] / other:.1f}x the others, "
            f"{sizes[worst]:.0f} voxels against {other_size:.0f}): its {ANISOTROPIC_PERCENTILE}th "
            f"percentile, {thick:.4g} mm"
        )
        target[worst] = thick
    return [round(float(t), 6) for t in target], why


def mirror_axes(cases: list[dict]) -> tuple[list[int], str]:
    """The axes random mirroring may flip: all but those along which two labels keep their order (hippocampus
    along PA, the kidneys along LR); nnU-Net flips all, teaching the network to ignore where labels lie."""
    labels = sorted({v for c in cases for v in c["label_centroids_mm"]}, key=int)
    orders = {}  # axis: the first pair of labels that keeps its order along it
    for axis, (a, b) in itertools.product(range(3), itertools.combinations(labels, 2)):
        both = [c["label_centroids_mm"] for c in cases if {a, b} <= c["label_centroids_mm"].keys()]
        before = sum(c[a][axis] < c[b][axis] for c in both)
        share = max(before, len(both) - before) / max(len(both), 1)
        if axis not in orders and len(both) >= ORDER_MIN_CASES and share >= ORDER_SHARE:
            orders[axis] = (
                f"labels {a}, {b} keep their order along {AXES[axis]} in {share:.0%} of {len(both)} cases"
            )
    kept = [axis for axis in range(3) if axis not in orders]
    if not orders:
        return kept, "every axis: no two labels keep their order along one"
    return kept, f"{'; '.join(orders.values())}: mirroring there would swap them"


def normalization(fingerprint: dict, channels: list[str]) -> tuple[dict, str, bool, str]:
    """(task.normalization, why, task.crop_foreground, why): nnU-Net's scheme per channel name."""
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
        why = (
            f"channel CT: clip to the foreground's 0.5-99.5 percentiles [{low:.4g}, {high:.4g}], z-score "
            f"with its mean {mean:.4g} and std {std:.4g} (all training cases)"
        )
        return norm, why, False, "CT: the background is air, not zero"
    masked = relative < MASK_BELOW
    share = f"the non-zero box holds {relative:.0%} of the median image"
    where = f"on the non-zero voxels ({share}, < 75%)" if masked else f"on every voxel ({share}, >= 75%)"
    why = f"channels {channels}: z-score per case and channel, {where}"
    kind = "zscore_nonzero" if masked else "zscore"
    return {"kind": kind}, why, masked, share + (": crop to it" if masked else ": no crop")


def gpu_patch(cfg: DictConfig, median, spacing, budget: int, target: Target) -> tuple[list[int], str]:
    """The largest patch of the median image's aspect whose batch-2 step fits `budget` bytes."""

    def patch_at(scale: float) -> list[int]:
        return padded_patch([max(1.0, m * scale) for m in median], GPU_DOWNSAMPLINGS, spacing)

    def fits(patch: list[int]) -> bool:
        try:
            return train_step_memory(cfg, 2, patch, target.precision).peak_bytes <= budget
        except InstantiationException:  # a patch too small for the network's least depth
            return False

    card = f"{target.name} ({budget / GIB:.1f} GiB usable) in {label(target.precision)}"
    if fits(whole := patch_at(1.0)):
        return whole, f"the median image at target spacing, {fmt(median)} voxels, padded; batch 2 fits {card}"
    low, high = 0.0, 1.0
    for _ in range(8):  # bisection over the scale: the peak grows with the patch
        mid = (low + high) / 2
        low, high = (mid, high) if fits(patch_at(mid)) else (low, mid)
    if low == 0.0:
        raise DatasetError(f"no patch of the median image's aspect fits batch 2 on {card}")
    why = f"{low:.2f} x the median image {fmt(median)} (its aspect): the largest whose batch 2 fits {card}"
    return patch_at(low), why


def planning_config(task: dict, model: str, precision: str) -> DictConfig:
    """The training config of the planned task, for the memory planner."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["task=synthetic", f"model={model}", f"precision={precision}"])
    OmegaConf.update(cfg, "task.synthetic", None, merge=False)
    for key, value in task.items():  # normalization is a typed node: merged into, not replaced
        OmegaConf.update(cfg, f"task.{key}", value, merge=key == "normalization")
    OmegaConf.update(cfg, "task.patch_size", [32, 32, 32], merge=False)  # replaced at every point
    return cfg


def even(batch: int) -> int:
    """A batch of whole volumes (data.samples_per_volume patches each), at least one volume."""
    return max(SAMPLES_PER_VOLUME, batch - batch % SAMPLES_PER_VOLUME)


def fmt(values) -> str:
    return "x".join(f"{v:.0f}" for v in values)
