"""LightningDataModule for one MSD task folder: checked, cached, patch-sampled."""

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader, Dataset, PersistentDataset
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning import LightningDataModule

from lightning_seg.data.download import download_msd_task, msd_source
from lightning_seg.data.msd import DatasetError, check_dataset, read_datalist
from lightning_seg.data.synthetic import write_synthetic_msd
from lightning_seg.data.transforms import train_transforms, val_transforms

log = logging.getLogger(__name__)


class MSDDataModule(LightningDataModule):
    """Train/validation split of an MSD task folder.

    `batch_size` counts patches per step: each loaded volume yields `samples_per_volume`
    random patches, so `batch_size / samples_per_volume` volumes are drawn per step.
    """

    def __init__(
        self,
        task_dir: str,
        task: Mapping,
        cache_dir: str | None = None,
        batch_size: int = 2,
        samples_per_volume: int = 2,
        pos_neg_ratio: Sequence[float] = (1, 1),
        augment: bool = True,
        flip_axes: Sequence[int] = (0, 1, 2),
        cache: str = "memory",
        num_workers: int = 0,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        split_seed: int = 0,
        prep_workers: int = 2,
    ) -> None:
        super().__init__()
        if batch_size % samples_per_volume:
            raise ValueError(
                f"data.batch_size={batch_size} must be a multiple of "
                f"data.samples_per_volume={samples_per_volume}"
            )
        if cache not in ("memory", "disk", "none"):
            raise ValueError(f"data.cache must be memory, disk or none, got '{cache}'")
        self.task_dir = Path(task_dir)
        self.task = OmegaConf.to_container(task, resolve=True) if isinstance(task, DictConfig) else dict(task)
        self.cache_dir = cache_dir
        self.batch_size, self.samples_per_volume = batch_size, samples_per_volume
        self.pos_neg_ratio, self.augment, self.flip_axes = list(pos_neg_ratio), augment, list(flip_axes)
        self.cache, self.num_workers, self.prep_workers = cache, num_workers, prep_workers
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.train_cases: list[dict[str, str]] = []
        self.val_cases: list[dict[str, str]] = []
        self.test_cases: list[dict[str, str]] = []  # held out of training and validation
        self.train_set = self.val_set = None

    def prepare_data(self) -> None:
        """Make sure the task folder exists (write or download it) and check every case."""
        if not (self.task_dir / "dataset.json").is_file():
            self._create_task_folder()
        check_dataset(
            self.task_dir, self.task["labels"], self.task["in_channels"], self.cache_dir, self.prep_workers
        )

    def _create_task_folder(self) -> None:
        task = self.task
        if task.get("synthetic"):
            log.info("writing the synthetic task to %s", self.task_dir)
            write_synthetic_msd(self.task_dir, num_labels=len(task["labels"]), **task["synthetic"])
        elif task.get("download"):
            log.info("downloading %s to %s", task["msd_folder"], self.task_dir.parent)
            download_msd_task(self.task_dir, task["msd_folder"], task.get("url"), task.get("md5"))
        else:
            url, _ = msd_source(task["msd_folder"], task.get("url"), task.get("md5"))
            raise DatasetError(
                f"{self.task_dir}: no MSD task folder here (expected dataset.json, imagesTr/, labelsTr/). "
                f"Point paths.data_dir at the folder that holds {task['msd_folder']}/, "
                f"or add task.download=true to fetch {url}."
            )

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.train_cases, self.val_cases, self.test_cases = split_cases(
            read_datalist(self.task_dir), self.val_fraction, self.test_fraction, self.split_seed
        )
        train_tf = train_transforms(
            self.task, self.samples_per_volume, self.pos_neg_ratio, self.augment, self.flip_axes
        )
        self.train_set = self._dataset(self.train_cases, train_tf, "train")
        self.val_set = self._dataset(self.val_cases, val_transforms(self.task), "val")

    def _dataset(self, cases, transform, split: str) -> Dataset:
        if self.cache == "memory":
            return CacheDataset(
                cases, transform, cache_rate=1.0, num_workers=self.prep_workers, progress=False
            )
        if self.cache == "disk":
            return PersistentDataset(cases, transform, cache_dir=self._persistent_dir(split))
        return Dataset(cases, transform)

    def _persistent_dir(self, split: str) -> Path:
        # PersistentDataset keys items by file name only: the preprocessing goes into the folder name
        recipe = {k: self.task[k] for k in ("orientation", "spacing", "normalization", "patch_size")}
        digest = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
        root = Path(self.cache_dir or self.task_dir.parent / ".cache")
        return root / "preprocessed" / f"{self.task['name']}-{split}-{digest}"

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size // self.samples_per_volume,
            shuffle=True,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=len(self.train_set) > 1,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_set, batch_size=1, num_workers=self.num_workers, persistent_workers=self.num_workers > 0
        )


def split_cases(cases: list, val_fraction: float, test_fraction: float, seed: int) -> tuple[list, list, list]:
    """Seeded shuffle into (train, val, test): `test_fraction` of the cases are held out of
    everything, `val_fraction` (at least one) validate. A single-case folder validates on
    its training case."""
    if len(cases) == 1:
        log.warning("only one case: validating on the training case")
        return cases, cases, []
    order = [cases[i] for i in np.random.default_rng(seed).permutation(len(cases))]
    n_test = round(test_fraction * len(cases))
    n_val = max(1, round(val_fraction * len(cases)))
    if n_test + n_val >= len(cases):
        raise ValueError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} leave no "
            f"training case of {len(cases)}"
        )
    return order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]
