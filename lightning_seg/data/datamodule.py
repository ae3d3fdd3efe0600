"""LightningDataModule for one task folder (MSD or nnU-Net v2 raw): checked, preprocessed once, patched."""

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import psutil
import torch
from monai.data import DataLoader, ThreadDataLoader, partition_dataset
from monai.transforms import MapTransform
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning import LightningDataModule
from torch.utils.data import DistributedSampler

from lightning_seg.data.checks import check_dataset
from lightning_seg.data.download import download_msd_task, msd_source
from lightning_seg.data.layout import DatasetError, case_name, read_datalist
from lightning_seg.data.patches import HOLD, PatchDataset, VolumeDataset
from lightning_seg.data.store import Store
from lightning_seg.data.synthetic import write_synthetic_msd
from lightning_seg.data.transforms import class_ratios, patch_transforms
from lightning_seg.errors import ConfigError
from lightning_seg.file_lock import exclusive

log = logging.getLogger(__name__)

CACHES = ("auto", *HOLD)
AUTO = "auto"  # data.batch_size chosen at setup by the study's memory planner (callbacks.auto_batch)
SPLIT_KEY = "split"  # in the datamodule's state, which Lightning saves in every checkpoint
LOADERS = {"torch": DataLoader, "thread": ThreadDataLoader}


def _checked_settings(batch_size: int | str, samples_per_volume: int, cache: str, loader: str) -> str:
    """Refuse settings the data module cannot run with; return the cache to use (gpu without one: memory)."""
    if batch_size != AUTO and batch_size % samples_per_volume:
        raise ConfigError(
            f"data.batch_size={batch_size} must be a multiple of data.samples_per_volume={samples_per_volume}"
        )
    for key, value, allowed in (("cache", cache, CACHES), ("loader", loader, LOADERS)):
        if value not in allowed:
            raise ConfigError(f"data.{key} must be one of {', '.join(allowed)}, got '{value}'")
    if cache == "gpu" and not torch.cuda.is_available():
        log.warning(
            "data.cache=gpu needs a CUDA GPU and none is available: holding the preprocessed training "
            "cases in CPU memory instead (data.cache=memory)"
        )
        return "memory"
    return cache


class MSDDataModule(LightningDataModule):
    """Train/validation/test split of a task folder, read as random patches from its preprocessed store.

    `prepare_data` checks the folder and writes its store once (lightning_seg.data.store): every later run,
    sweep job and process reads it. `batch_size` counts patches per step, `samples_per_volume` per drawn
    case. `cache` says where training reads cases from: "disk" (patches read from the memory-mapped store:
    a process's memory does not grow with the dataset), "memory" (every training case loaded once, for
    datasets small beside the host memory), "gpu" (on this process's GPU, patches cut and augmented there,
    MONAI's fast-training recipe), "auto" (memory when the training cases take at most `memory_share` of
    the host memory per process on this node, else disk). A given `split` (split.json's or a checkpoint's,
    cases matched by label file name) replaces the seeded one, so a resumed run trains on its cases. Under
    DDP (`use_distributed_sampler=False`) each validation case is validated by exactly one process, so
    `val/dice` equals a single-process one; training cases are reshuffled across processes every epoch, or
    with `cache_shard_per_rank` each process holds and trains on a fixed, seeded 1/N of them."""

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
        cache: str = "auto",
        memory_share: float = 0.125,
        loader: str = "torch",
        num_workers: int = 0,
        val_fraction: float = 0.2,
        test_fraction: float = 0.0,
        split_seed: int = 0,
        num_folds: int = 0,
        fold: int = 0,
        prep_workers: int = 1,
        crop_centres_per_class: int = 10000,
        cache_shard_per_rank: bool = False,
        augmentation: Sequence[MapTransform] = (),
        split: Mapping[str, Sequence[Mapping[str, str]]] | None = None,
        max_image_gib: float | None = None,
        allow_outside_paths: bool = False,
    ) -> None:
        super().__init__()
        cache = _checked_settings(batch_size, samples_per_volume, cache, loader)
        self.task_dir, self.cache_dir = Path(task_dir), cache_dir
        self.task = OmegaConf.to_container(task, resolve=True) if isinstance(task, DictConfig) else dict(task)
        self.batch_size, self.samples_per_volume = batch_size, samples_per_volume
        self.pos_neg_ratio, self.augment, self.flip_axes = list(pos_neg_ratio), augment, list(flip_axes)
        self.cache, self.loader, self.cache_shard_per_rank = cache, loader, cache_shard_per_rank
        self.memory_share, self.data_source = memory_share, None
        self.num_workers, self.prep_workers = num_workers, prep_workers
        self.crop_centres_per_class, self.augmentation = crop_centres_per_class, list(augmentation)
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.num_folds, self.fold, self.split = num_folds, fold, split
        self.max_image_gib, self.allow_outside_paths = max_image_gib, allow_outside_paths
        self.train_cases, self.val_cases, self.test_cases = [], [], []  # test: held out of both others
        self.train_set = self.val_set = None
        self.prepared = False

    def prepare_data(self) -> None:
        """Check the task folder, then write the store's missing or changed cases. Once: training prepares
        before the Trainer starts its processes, whose copies of this object then skip it."""
        if self.prepared:
            return
        cases = self.check()
        written = self.store.build(cases, self.prep_workers)
        log.info(
            "preprocessed store %s: %d case(s) written, %d as they were",
            self.store.path, written, len(cases) - written,
        )  # fmt: skip
        self.prepared = True

    def check(self) -> list[dict]:
        """Write or download the task folder if missing, then check every case; return the cases."""
        self._ensure_task_folder()
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
        return cases

    @property
    def store(self) -> Store:
        root = Path(self.cache_dir) if self.cache_dir is not None else self.task_dir.parent / ".cache"
        return Store(root, self.task_dir, self.task, self.crop_centres_per_class)

    def choose_cache(self, local_processes: int = 1) -> dict:
        """Where training reads its cases from (data.cache=auto: from the store's size and the host memory
        per process on this node), with the reason: for the log and environment.json."""
        if self.data_source is not None:
            return self.data_source
        self.assign_split()
        shard = self.cache_shard_per_rank and local_processes > 1
        held = self.store.size_bytes(self.train_cases) / (local_processes if shard else 1)
        budget = self.memory_share * psutil.virtual_memory().total / local_processes
        gib = 2.0**30
        fits = held <= budget
        choice = self.cache if self.cache != "auto" else "memory" if fits else "disk"
        share = f"data.memory_share={self.memory_share} of the host memory per process"
        reason = f"{held / gib:.2f} GiB of training cases; {share}: {budget / gib:.2f} GiB"
        if self.cache != "auto":
            reason = "data.cache"
        elif not fits:
            reason += ": patches are read from the memory-mapped store, which the OS page cache keeps"
        self.data_source = {
            "cache": choice,
            "reason": reason,
            "store": str(self.store.path),
            "training_gib": round(held / gib, 3),
        }
        log.info("training cases read from %s (%s); store %s", choice, reason, self.store.path)
        return self.data_source

    def _ensure_task_folder(self) -> None:
        """Write (synthetic) or download the task folder where the task says so, else require it."""
        task, dataset_json = self.task, self.task_dir / "dataset.json"
        if task.get("synthetic") or task.get("download"):
            # a sweep's points start together: one writes, the others wait for it and find it written
            lock = self.task_dir.parent / f".{self.task_dir.name}.lock"
            if dataset_json.is_file() and not lock.is_file():
                return  # written before, not by a process that may still be at it
            self.task_dir.parent.mkdir(parents=True, exist_ok=True)
            with exclusive(lock, self.task_dir):
                if dataset_json.is_file():
                    return
                if task.get("synthetic"):
                    log.info("writing the synthetic task to %s", self.task_dir)
                    write_synthetic_msd(self.task_dir, num_labels=len(task["labels"]), **task["synthetic"])
                else:
                    log.info("downloading %s to %s", task["msd_folder"], self.task_dir.parent)
                    download_msd_task(self.task_dir, task["msd_folder"], task.get("url"), task.get("md5"))
        elif not dataset_json.is_file():
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
        store = self.store
        # prepare_data wrote them; a caller that skipped it (or a changed file) gets them written here
        store.build(self.train_cases + self.val_cases, self.prep_workers)
        if self.val_set is None:
            self.check_processes(world)
            self.val_set = VolumeDataset(store, self.val_cases[rank::world])
        if self.train_set is not None or stage not in (None, "fit"):
            return
        train_cases = self.train_cases
        if world > 1 and self.cache_shard_per_rank:
            shard = partition_dataset(
                train_cases, num_partitions=world, shuffle=True, seed=self.split_seed, even_divisible=True
            )[rank]
            log.info(
                "rank %d holds and trains on %d of %d training cases", rank, len(shard), len(train_cases)
            )
            train_cases = shard
        hold = self.choose_cache(self._local_processes())["cache"]
        self.train_set = PatchDataset(
            [store.case(c) for c in train_cases],
            self.task["patch_size"],
            self.samples_per_volume,
            class_ratios(self.pos_neg_ratio, len(self.task["labels"])),
            patch_transforms(self.augment, self.flip_axes, self.augmentation),
            hold,
            self._device() if hold == "gpu" else None,
        )

    def _local_processes(self) -> int:
        return self.trainer.num_devices if self.trainer is not None else 1

    def _rank_and_world(self) -> tuple[int, int]:
        return (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)

    def _device(self) -> torch.device:
        if self.trainer is not None:
            return self.trainer.strategy.root_device
        return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")

    def state_dict(self) -> dict:
        """The split goes into every checkpoint: a resume trains on the same cases."""
        return {SPLIT_KEY: {"train": self.train_cases, "val": self.val_cases, "test": self.test_cases}}

    def train_dataloader(self) -> DataLoader:
        if self.batch_size == AUTO:
            raise ConfigError(
                "data.batch_size=auto is chosen by the memory planner's callback (callbacks.auto_batch, "
                "in the default `measure` group): add it back, or give data.batch_size a number"
            )
        on_gpu = self.train_set.hold == "gpu"
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
    def _loader(dataset, loader: str, num_workers: int, **kwargs) -> DataLoader:
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
