"""Pictures of what the network segments: image, reference and prediction of a few validation cases."""

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from pytorch_lightning import Callback, Trainer
from pytorch_lightning.loggers import WandbLogger
from torch.utils.data import DataLoader, SequentialSampler

from lightning_seg.model.module import SegmentationModule  # declares what callbacks read

WANDB_KEY = "val_images"
GAP = 2  # background pixels between the three slices of a mosaic
ALPHA = 0.5  # label colour over the image


class ValidationImages(Callback):
    """At every validation but the sanity check, for the first `count` validation batches (fixed cases:
    validation is not shuffled; under DDP, global rank zero's, which alone draws and logs): per axis the
    slice with the most reference foreground as image, reference and prediction, one colour per label.
    Writes `dirpath/epochEEEE-stepSSSSSS-<case>.png`; with a WandbLogger also `wandb.Image`s under
    `val_images` with `prediction` and `ground_truth` masks. Needs `validation_step`'s argmax (B, D, H, W)."""

    def __init__(self, dirpath: str, count: int = 3) -> None:
        self.dirpath, self.count = Path(dirpath), count
        self._wandb_images: list = []
        self._cases: list[str] = []

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: SegmentationModule) -> None:
        self._wandb_images = []
        self._cases = _case_names(trainer, self.count)

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: SegmentationModule, outputs, batch, batch_idx, dataloader_idx=0
    ) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or batch_idx >= self.count:
            return
        if not isinstance(outputs, torch.Tensor):
            raise TypeError("ValidationImages needs validation_step to return the argmax prediction")
        image = batch["image"][0, 0].detach().float().cpu().numpy()
        reference = batch["label"][0, 0].detach().cpu().numpy().astype(np.uint8)
        prediction = outputs[0].detach().cpu().numpy().astype(np.uint8)
        indices = busiest_slices(reference)
        gray, ref, pred = (
            _mosaic(_slices(volume, indices)) for volume in (_to_uint8(image, indices), reference, prediction)
        )
        case = self._cases[batch_idx]
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"epoch{trainer.current_epoch:04d}-step{trainer.global_step:06d}-{case}.png"
        _draw(path, gray, ref, pred, pl_module.labels, f"{case}, epoch {trainer.current_epoch}")
        if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
            self._wandb_images.append((case, gray, ref, pred))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: SegmentationModule) -> None:
        if not self._wandb_images:
            return
        import wandb

        class_labels = dict(enumerate(pl_module.labels))
        # one size for all: W&B draws a list of images of different sizes wrongly (and warns)
        height, width = np.max([gray.shape for _, gray, _, _ in self._wandb_images], axis=0)
        images = []
        for case, *planes in self._wandb_images:
            gray, ref, pred = (_pad(plane, height, width) for plane in planes)
            masks = {
                "prediction": {"mask_data": pred, "class_labels": class_labels},
                "ground_truth": {"mask_data": ref, "class_labels": class_labels},
            }
            images.append(wandb.Image(gray, caption=case, masks=masks))
        self._wandb_images = []
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_metrics({WANDB_KEY: images}, step=trainer.global_step)


def busiest_slices(reference: np.ndarray) -> list[int]:
    """Per axis, the slice with the most reference foreground (the middle one where there is none)."""
    counts = [(reference > 0).sum(axis=tuple(a for a in range(3) if a != axis)) for axis in range(3)]
    return [int(c.argmax()) if c.any() else reference.shape[axis] // 2 for axis, c in enumerate(counts)]


def _slices(volume: np.ndarray, indices: list[int]) -> list[np.ndarray]:
    """The slices at `indices` along each axis, rotated so that the second remaining axis points up."""
    return [np.rot90(np.take(volume, index, axis=axis)) for axis, index in enumerate(indices)]


def _pad(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """Zero-padded at the bottom and right to height x width."""
    return np.pad(plane, ((0, height - plane.shape[0]), (0, width - plane.shape[1])))


def _mosaic(parts: list[np.ndarray]) -> np.ndarray:
    """The three slices side by side, top-aligned, zero-padded to a common height."""
    height = max(p.shape[0] for p in parts)
    return np.concatenate([_pad(p, height, p.shape[1] + GAP) for p in parts], axis=1)[:, :-GAP]


def _to_uint8(image: np.ndarray, indices: list[int]) -> np.ndarray:
    """Robust grey levels: the 1st to 99th percentile of the non-zero voxels of the drawn slices (not
    the whole volume: cheap for a CT) mapped to 1..255; 0 stays for the padding between slices."""
    values = np.concatenate([s.ravel() for s in _slices(image, indices)])
    values = values[values != 0]
    low, high = np.percentile(values, (1, 99)) if values.size else (0.0, 1.0)
    scaled = (image - low) / max(high - low, 1e-6)
    return (1 + np.clip(scaled, 0, 1) * 254).astype(np.uint8)


def _overlay(gray: np.ndarray, labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    rgb = np.repeat(gray[..., None] / 255.0, 3, axis=2)
    return np.where((labels > 0)[..., None], (1 - ALPHA) * rgb + ALPHA * colours[labels], rgb)


def _draw(path: Path, gray, ref, pred, names: list[str], title: str) -> None:
    """One axes holding three rows (image, reference, prediction): far cheaper than nine subplots."""
    # RGB per label index; background (index 0) is never drawn
    colours = np.array([matplotlib.colormaps["tab10"](i % 10)[:3] for i in range(len(names))])
    gap = np.ones((GAP, gray.shape[1], 3))
    rows = [_overlay(gray, labels, colours) for labels in (np.zeros_like(ref), ref, pred)]
    picture = np.concatenate([rows[0], gap, rows[1], gap, rows[2]], axis=0)
    height, width = picture.shape[:2]
    # 40 pixels per inch, plus margins (inches) for the row names, the title and the legend
    left, bottom, top = 0.3, 0.35, 0.3
    size = (width / 40 + left + 0.1, height / 40 + bottom + top)
    fig = Figure(figsize=size, dpi=100)
    ax = fig.add_axes((left / size[0], bottom / size[1], width / 40 / size[0], height / 40 / size[1]))
    ax.imshow(picture, interpolation="nearest")
    ax.set_axis_off()
    for row, name in enumerate(("image", "reference", "prediction")):
        y = row * (gray.shape[0] + GAP) + gray.shape[0] / 2
        ax.text(-2, y, name, ha="right", va="center", fontsize=7, rotation=90)
    handles = [Patch(color=colours[i], label=name) for i, name in enumerate(names) if i > 0]
    fig.legend(handles=handles, loc="lower center", fontsize=7, ncols=len(handles), frameon=False)
    fig.suptitle(title, fontsize=8)
    fig.savefig(path)


def _case_names(trainer: Trainer, count: int) -> list[str]:
    """Names of the first `count` validation cases: the image file names without .nii.gz of the MONAI
    dataset's case dicts (`data`; under DDP this rank's share) for a sequential loader of one case per
    batch (a shuffling sampler would draw from the global random state here), else `case<batch index>`."""
    loader = trainer.val_dataloaders
    cases = getattr(getattr(loader, "dataset", None), "data", None)
    one_by_one = isinstance(loader, DataLoader) and loader.batch_size == 1
    if not (one_by_one and isinstance(loader.sampler, SequentialSampler) and isinstance(cases, Sequence)):
        cases = []
    names = []
    for i, case in enumerate(cases[:count]):
        image = case.get("image") if isinstance(case, Mapping) else None
        is_path = isinstance(image, str | Path)
        names.append(Path(image).name.removesuffix(".gz").removesuffix(".nii") if is_path else f"case{i}")
    return names + [f"case{i}" for i in range(len(names), count)]
