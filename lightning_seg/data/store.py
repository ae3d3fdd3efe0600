"""The preprocessed store: every case of a task folder reoriented, resampled and normalized once, with its
patch-centre candidates, in a folder keyed by the task folder and the preprocessing settings. Every run,
sweep job, DDP process and node (on a shared filesystem) reads it, as nnU-Net reads what its
plan_and_preprocess wrote; training reads patches from it without loading volumes.

    <cache_dir>/preprocessed/<task>-<digest>/
        settings.json                   what the digest covers
        .lock                           one writer at a time (flock: released when its process dies)
        <case>/image.npy                float32 (C, X, Y, Z): uncompressed, so a patch read touches only
        <case>/label.npy                uint8 (X, Y, Z)        its pages (np.load's mmap_mode)
        <case>/centres.npz              patch-centre candidates per class, inside the training box
        <case>/case.json                source files' size and mtime, shape, training box

A case folder is written under a temporary name and renamed into place whole, so a reader never sees half
a case and a killed writer leaves only a temporary folder the next writer removes. Compressed chunks
(blosc2, zarr) would take several times less disk, but every patch read would decompress in every worker;
nnU-Net also unpacks its compressed cases to plain .npy before training reads them."""

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np
from monai.transforms import Compose
from monai.transforms.utils import generate_spatial_bounding_box, map_classes_to_indices
from tqdm import tqdm

from lightning_seg.data.checks import case_stamp
from lightning_seg.data.layout import NIFTI_ENDINGS, case_name
from lightning_seg.data.transforms import nonzero, normalization, resampling
from lightning_seg.file_lock import exclusive
from lightning_seg.run_dir import write_atomic

log = logging.getLogger(__name__)

FORMAT = 1  # raised when what a case folder holds changes: older stores are then written again
# the task keys preprocessing reads; anything else (patch size, augmentation, batch) leaves the store as is
PREPROCESSING_KEYS = ("orientation", "spacing", "normalization", "crop_foreground", "labels", "in_channels")


class Store:
    """The store of one task folder under one set of preprocessing settings."""

    def __init__(self, root: str | os.PathLike, task_dir: str | os.PathLike, task: Mapping, max_centres: int):
        self.task, self.max_centres = dict(task), max_centres
        self.settings = {
            "format": FORMAT,
            "task_dir": str(Path(task_dir).resolve()),
            **{key: self.task[key] for key in PREPROCESSING_KEYS},
            "crop_centres_per_class": max_centres,
        }
        digest = hashlib.sha1(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:12]
        self.path = Path(root) / "preprocessed" / f"{self.task['name']}-{digest}"

    def case(self, case: Mapping) -> "StoredCase":
        name = case_name(case)
        stem = next((name[: -len(e)] for e in NIFTI_ENDINGS if name.endswith(e)), name)
        return StoredCase(self.path / stem)

    def stale(self, cases: Sequence[Mapping]) -> list[Mapping]:
        """The cases not in the store, or stored from files that have changed since."""
        return [case for case in cases if self.case(case).source() != case_stamp(case)]

    def build(self, cases: Sequence[Mapping], workers: int) -> int:
        """Write every stale case (in `workers` threads); return how many were written. Concurrent
        callers wait for the one writing and then find the cases written."""
        if not self.stale(cases):
            return 0
        self.path.mkdir(parents=True, exist_ok=True)
        with exclusive(self.path / ".lock", self.path):
            todo = self.stale(cases)  # what another process wrote while this one waited is done
            for leftover in [*self.path.glob(".tmp-*"), *self.path.glob(".old-*")]:  # a killed writer's
                shutil.rmtree(leftover, ignore_errors=True)
            if todo:
                write_atomic(self.path / "settings.json", json.dumps(self.settings, indent=2))
                self._write(todo, workers)
        return len(todo)

    def _write(self, cases: list[Mapping], workers: int) -> None:
        workers = max(1, min(workers, len(cases)))
        log.info(
            "preprocessing %d case(s) into %s with %d thread(s): once, every later run reads them",
            len(cases), self.path, workers,
        )  # fmt: skip
        start = time.monotonic()
        bar = tqdm(total=len(cases), desc="preprocessing", unit="case", mininterval=2.0)
        jobs = [(dict(case), self.task, self.max_centres, self.case(case).folder) for case in cases]
        # threads: loading (zlib), resampling (torch) and saving release the GIL, and nothing is
        # imported again or pickled, as worker processes would
        with ThreadPoolExecutor(workers) as pool:
            for done in as_completed([pool.submit(write_case, *job) for job in jobs]):
                done.result()
                bar.update()
        bar.close()
        log.info("preprocessed %d case(s) in %.1f s", len(cases), time.monotonic() - start)

    def size_bytes(self, cases: Sequence[Mapping]) -> int:
        return sum(self.case(case).size_bytes() for case in cases)


class StoredCase:
    """One case folder of the store."""

    def __init__(self, folder: Path):
        self.folder = folder

    def meta(self) -> dict | None:
        with contextlib.suppress(OSError, json.JSONDecodeError):
            return json.loads((self.folder / "case.json").read_text())
        return None

    def source(self) -> list | None:
        """The source files' stamps the case was written from, or None when it is not there."""
        meta = self.meta()
        return meta["source"] if meta else None

    def arrays(self, mmap: bool) -> tuple[np.ndarray, np.ndarray]:
        """(image, label); `mmap`: mapped, read from disk (or the page cache) only where indexed."""
        mode = "r" if mmap else None
        return tuple(np.load(self.folder / f"{key}.npy", mmap_mode=mode) for key in ("image", "label"))

    def centres(self) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """(flat indices per class into the training box, box start, box end)."""
        with np.load(self.folder / "centres.npz") as saved:
            classes = sorted((k for k in saved.files if k.startswith("class_")), key=lambda k: int(k[6:]))
            return [saved[k] for k in classes], saved["box_start"], saved["box_end"]

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir())


def write_case(case: Mapping, task: Mapping, max_centres: int, folder: Path) -> None:
    """Preprocess one case into `folder` (module level: run in worker processes)."""
    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    data = Compose(resampling(task))(dict(case))
    image = data["image"]
    # the training box: the non-zero box before normalization (z-scoring turns the zero background
    # negative), else everything; validation reads the whole volume
    if task["crop_foreground"]:
        start, end = (np.asarray(c) for c in generate_spatial_bounding_box(image, select_fn=nonzero))
        if np.any(end <= start):  # an all-zero image: nothing to crop to
            start, end = np.zeros(3, int), np.asarray(image.shape[1:])
    else:
        start, end = np.zeros(3, int), np.asarray(image.shape[1:])
    image = np.ascontiguousarray(normalization(task["normalization"])(data)["image"].numpy(), np.float32)
    label = data["label"].numpy()[0].round().astype(np.uint8 if len(task["labels"]) <= 256 else np.int16)
    box = tuple(slice(a, b) for a, b in zip(start, end, strict=True))
    indices = map_classes_to_indices(
        label[box][None], num_classes=len(task["labels"]), max_samples_per_class=max_centres
    )
    np.save(tmp / "image.npy", image)
    np.save(tmp / "label.npy", label)
    classes = {f"class_{i}": np.asarray(idx, np.int64) for i, idx in enumerate(indices)}
    np.savez(tmp / "centres.npz", box_start=start, box_end=end, **classes)
    meta = {"source": case_stamp(case), "shape": list(image.shape), "box": [start.tolist(), end.tolist()]}
    (tmp / "case.json").write_text(json.dumps(meta))  # last: the folder is complete when it is renamed
    if folder.exists():  # a changed source file: the new case replaces the old one whole
        old = folder.parent / f".old-{folder.name}-{os.getpid()}"
        folder.rename(old)
        shutil.rmtree(old)
    tmp.rename(folder)
