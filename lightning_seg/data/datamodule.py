"""LightningDataModule for one task folder (MSD or nnU-Net v2 raw): checked, cached, patch-sampled."""

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.data import (
    CacheDataset,
    DataLoader,
    Dataset,
    PersistentDataset,
    ThreadDataLoader,
    partition_dataset,
)
from monai.transforms import MapTransform
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning import LightningDataModule
from torch.utils.data import DistributedSampler

from lightning_seg.data.checks import check_dataset
from lightning_seg.data.download import download_msd_task, msd_source
from lightning_seg.data.layout import DatasetError, case_name, read_datalist
from lightning_seg.data.synthetic import write_synthetic_msd
from lightning_seg.data.transforms import train_transforms, val_transforms
from lightning_seg.errors import ConfigError

log = logging.getLogger(__name__)

CACHES = ("memory", "disk", "gpu", "none")
AUTO = "auto"  # data.batch_size chosen at setup by the study's memory planner (callbacks.auto_batch)
SPLIT_KEY = "split"  # in the datamodule's state, which Lightning saves in every checkpoint
LOADERS = {"torch": DataLoader, "thread": ThreadDataLoader}


class MSDDataModule(LightningDataModule):
    """Train/validation/test split of a task folder, as cached, patch-sampled datasets.

    `batch_size` counts patches per step, `samples_per_volume` per loaded volume. A given `split`
    (split.json's or a checkpoint's, cases matched by label file name) replaces the seeded one, so a
    resumed run trains on its cases. `cache="gpu"` keeps the training volumes on this process's GPU and
    crops there (MONAI's fast-training recipe). Under DDP (`use_distributed_sampler=False`) each
    validation case is validated by exactly one process, so `val/dice` equals a single-process one;
    training cases are reshuffled across processes every epoch, or with `cache_shard_per_rank` each
    process caches and trains on a fixed, seeded 1/N of them."""

    def __init__(
        self,
        task_dir: str,
        task: Mapping,
        cache_dir: str | None = None,
        batch_size: int | str = 2,
        samples_per_volume: int = 2,
        pos_neg_ratio: Sequence[float] = (1, 1),
        augment: bool = True,
        flip_axes: Sequence[int] = (0, 1, 2),
        cache: str = "memory",
        loader: str = "torch",
        num_workers: int = 0,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        split_seed: int = 0,
        num_folds: int = 0,
        fold: int = 0,
        prep_workers: int = 2,
        crop_centres_per_class: int = 10000,
        cache_shard_per_rank: bool = False,
        augmentation: Sequence[MapTransform] = (),
        split: Mapping[str, Sequence[Mapping[str, str]]] | None = None,
        max_image_gib: float | None = None,
        allow_outside_paths: bool = False,
    ) -> None:
        super().__init__()
        if batch_size != AUTO and batch_size % samples_per_volume:
            raise ConfigError(
                f"data.batch_size={batch_size} must be a multiple of "
                f"data.samples_per_volume={samples_per_volume}"
            )
        for key, value, allowed in (("cache", cache, CACHES), ("loader", loader, LOADERS)):
            if value not in allowed:
                raise ConfigError(f"data.{key} must be one of {', '.join(allowed)}, got '{value}'")
        if cache == "gpu" and not torch.cuda.is_available():
            log.warning(
                "data.cache=gpu needs a CUDA GPU and none is available: caching preprocessed volumes "
                "in CPU memory instead (data.cache=memory)"
            )
            cache = "memory"
        self.task_dir, self.cache_dir = Path(task_dir), cache_dir
        self.task = OmegaConf.to_container(task, resolve=True) if isinstance(task, DictConfig) else dict(task)
        self.batch_size, self.samples_per_volume = batch_size, samples_per_volume
        self.pos_neg_ratio, self.augment, self.flip_axes = list(pos_neg_ratio), augment, list(flip_axes)
        self.cache, self.loader, self.cache_shard_per_rank = cache, loader, cache_shard_per_rank
        self.num_workers, self.prep_workers = num_workers, prep_workers
        self.crop_centres_per_class, self.augmentation = crop_centres_per_class, list(augmentation)
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.num_folds, self.fold, self.split = num_folds, fold, split
        self.max_image_gib, self.allow_outside_paths = max_image_gib, allow_outside_paths
        self.train_cases, self.val_cases, self.test_cases = [], [], []  # test: held out of both others
        self.train_set = self.val_set = None
        self.prepared = False

    def prepare_data(self) -> None:
        """Write or download the task folder if missing, then check every case. Once: training prepares
        before the Trainer starts its processes, whose copies of this object then skip it."""
        if self.prepared:
            return
        if not (self.task_dir / "dataset.json").is_file():
            self._create_task_folder()
        cases = check_dataset(
            self.task_dir,
            self.task["labels"],
            self.task["in_channels"],
            self.cache_dir,
            self.prep_workers,
            self.max_image_gib,
            self.allow_outside_paths,
        )
        log.info("dataset check: the %d cases of %s are fine", len(cases), self.task_dir)
        self.prepared = True

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
            found = "no dataset.json in this folder" if self.task_dir.is_dir() else "no such folder"
            raise DatasetError(
                f"{self.task_dir}: {found} (an MSD task folder holds dataset.json, imagesTr/, labelsTr/). "
                f"Point paths.data_dir at the folder that holds {task['msd_folder']}/, "
                f"or add task.download=true to fetch {url}."
            )

    def assign_split(self) -> None:
        """Train, validation and test cases (the saved split or a seeded one); no data is loaded."""
        if self.train_cases:
            return
        cases = read_datalist(self.task_dir, self.allow_outside_paths)
        if self.split is not None:
            self.train_cases, self.val_cases, self.test_cases = given_split(cases, self.split, self.task_dir)
        else:
            self.train_cases, self.val_cases, self.test_cases = split_cases(
                cases, self.val_fraction, self.test_fraction, self.split_seed, self.num_folds, self.fold
            )

    def check_processes(self, world_size: int) -> None:
        """Every process validates at least one case (a process without any would leave the others
        waiting for it at the end of validation) and fills at least one training batch (else Lightning
        ends the fit at once, "No training batches", with exit code 0 and nothing trained)."""
        self.assign_split()
        if len(self.val_cases) < world_size:
            raise ConfigError(
                f"{len(self.val_cases)} validation case(s) for {world_size} processes: each process "
                "validates at least one; raise data.val_fraction or use fewer devices"
            )
        if self.batch_size == AUTO:
            return
        per_process = math.ceil(len(self.train_cases) / world_size)
        volumes = self.batch_size // self.samples_per_volume  # loaded volumes per step and process
        if 1 < per_process < volumes:  # one case alone is one (short) batch: drop_last keeps it
            fits, train = per_process * self.samples_per_volume, len(self.train_cases)
            total = train + len(self.val_cases) + len(self.test_cases)
            where = f" on {world_size} processes" if world_size > 1 else ""
            raise ConfigError(
                f"data.batch_size={self.batch_size} draws {volumes} training volumes per step "
                f"({self.samples_per_volume} patches each, data.samples_per_volume), but {train} of the "
                f"{total} cases train{where}: use data.batch_size={fits} or less, or "
                f"data.samples_per_volume={self.batch_size} (every patch of a step from one volume)"
            )

    def setup(self, stage: str | None = None) -> None:
        """This process's datasets: Lightning calls it in every process once they exist."""
        self.assign_split()
        rank, world = self._rank_and_world()
        if self.val_set is None:
            self.check_processes(world)
            # no device: whole validation volumes on the GPU would compete with sliding-window stitching
            self.val_set = self._dataset(self.val_cases[rank::world], val_transforms(self.task), "val")
        if self.train_set is not None or stage not in (None, "fit"):
            return
        train_cases = self.train_cases
        if world > 1 and self.cache_shard_per_rank:
            shard = partition_dataset(
                train_cases, num_partitions=world, shuffle=True, seed=self.split_seed, even_divisible=True
            )[rank]
            log.info(
                "rank %d caches and trains on %d of %d training cases", rank, len(shard), len(train_cases)
            )
            train_cases = shard
        train_tf = train_transforms(
            self.task,
            self.samples_per_volume,
            self.pos_neg_ratio,
            self.augment,
            self.flip_axes,
            self.crop_centres_per_class,
            self._device() if self.cache == "gpu" else None,
            self.augmentation,
        )
        self.train_set = self._dataset(train_cases, train_tf, "train")

    def _rank_and_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def _device(self) -> torch.device:
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")

    def state_dict(self) -> dict:
        """The split goes into every checkpoint: a resume trains on the same cases."""
        return {SPLIT_KEY: {"train": self.train_cases, "val": self.val_cases, "test": self.test_cases}}

    def _dataset(self, cases, transform, split: str) -> Dataset:
        if self.cache in ("memory", "gpu"):
            # no deep copy per draw: the random transforms make new tensors (crop views, flipped
            # and rescaled copies) and never write into the cached ones
            return CacheDataset(
                cases, transform, num_workers=self.prep_workers, progress=False, copy_cache=False
            )
        if self.cache == "disk":
            return PersistentDataset(cases, transform, cache_dir=self._persistent_dir(split))
        return Dataset(cases, transform)

    def _persistent_dir(self, split: str) -> Path:
        # PersistentDataset keys items by file name only: the preprocessing goes into the folder name
        keys = ("orientation", "spacing", "normalization", "patch_size", "labels", "crop_foreground")
        recipe = {k: self.task[k] for k in keys} | {"crop_centres_per_class": self.crop_centres_per_class}
        digest = hashlib.sha1(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]
        root = Path(self.cache_dir or self.task_dir.parent / ".cache")
        return root / "preprocessed" / f"{self.task['name']}-{split}-{digest}"

    def train_dataloader(self) -> DataLoader:
        if self.batch_size == AUTO:
            raise ConfigError(
                "data.batch_size=auto is chosen by the memory planner's callback (callbacks.auto_batch, "
                "in the default `measure` group): add it back, or give data.batch_size a number"
            )
        on_gpu = self.cache == "gpu"
        rank, world = self._rank_and_world()
        sampler = None
        if world > 1 and not self.cache_shard_per_rank:
            # what Lightning's own distributed sampler would be (same seed); Lightning sets its epoch
            seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
            sampler = DistributedSampler(self.train_set, num_replicas=world, rank=rank, seed=seed)
        # CUDA tensors cannot cross worker processes: the loader's thread draws the patches on the GPU
        return self._loader(
            self.train_set,
            "thread" if on_gpu else self.loader,
            0 if on_gpu else self.num_workers,
            batch_size=self.batch_size // self.samples_per_volume,
            shuffle=sampler is None,
            sampler=sampler,
            pin_memory=torch.cuda.is_available() and not on_gpu,
            drop_last=len(self.train_set) > 1,
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.loader, self.num_workers, batch_size=1)

    @staticmethod
    def _loader(dataset: Dataset, loader: str, num_workers: int, **kwargs) -> DataLoader:
        return LOADERS[loader](dataset, num_workers=num_workers, persistent_workers=num_workers > 0, **kwargs)


def split_cases(
    cases: list, val_fraction: float, test_fraction: float, seed: int, num_folds: int = 0, fold: int = 0
) -> tuple[list, list, list]:
    """Seeded shuffle of the cases (sorted by name) into (train, val, test): `test_fraction` held out
    of everything, `val_fraction` (at least one) validating; a single case validates on itself. With
    `num_folds` the rest is cut into that many folds (sizes differ by one at most); `fold` validates."""
    if len(cases) == 1:
        log.warning("only one case: validating on the training case")
        return cases, cases, []
    # cases by name first: the same cases split the same way whatever their listing's order or layout
    cases = sorted(cases, key=case_name)
    order = [cases[i] for i in np.random.default_rng(seed).permutation(len(cases))]
    n_test = round(test_fraction * len(cases))
    if num_folds:
        return _fold(order[n_test:], num_folds, fold) + (order[:n_test],)
    n_val = max(1, round(val_fraction * len(cases)))
    if n_test + n_val >= len(cases):
        raise ConfigError(
            f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} leave no "
            f"training case of {len(cases)}"
        )
    return order[n_test + n_val :], order[n_test : n_test + n_val], order[:n_test]


def _fold(cases: list, num_folds: int, fold: int) -> tuple[list, list]:
    if not 0 <= fold < num_folds:
        raise ConfigError(f"data.fold={fold}: choose 0 to {num_folds - 1} for data.num_folds={num_folds}")
    if num_folds < 2 or num_folds > len(cases):
        raise ConfigError(
            f"data.num_folds={num_folds}: needs 2 to {len(cases)} (the cases left after the test cases)"
        )
    folds = np.array_split(np.arange(len(cases)), num_folds)
    val = [cases[i] for i in folds[fold]]
    train = [cases[i] for k, indices in enumerate(folds) if k != fold for i in indices]
    return train, val


def given_split(cases: list, split: Mapping, task_dir: Path) -> tuple[list, list, list]:
    """(train, val, test) of `cases` (this folder's dataset.json) named by a saved split."""
    by_name = {case_name(c): c for c in cases}
    names = [[case_name(c) for c in split.get(part, [])] for part in ("train", "val", "test")]
    missing = [n for part in names for n in part if n not in by_name]
    if missing:
        shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
        raise DatasetError(
            f"{task_dir / 'dataset.json'}: lacks {len(missing)} case(s) of the run's saved split "
            f"({shown}): resume with the data the run started on"
        )
    return tuple([by_name[n] for n in part] for part in names)


def split_in_checkpoint(checkpoint: Mapping) -> dict | None:
    """The split a checkpoint's datamodule state holds, or None. Lightning keys that state by the
    datamodule's class name, so it is found by its content: a subclass's checkpoints have it too."""
    for value in checkpoint.values():
        if isinstance(value, Mapping) and isinstance(value.get(SPLIT_KEY), Mapping):
            return dict(value[SPLIT_KEY])
    return None
