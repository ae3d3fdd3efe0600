"""The training data path: what the store holds, what a batch holds, where it lives."""

import copy
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from monai.data import DataLoader, ThreadDataLoader
from monai.transforms import Compose

from lightning_seg.data.datamodule import MSDDataModule
from lightning_seg.data.transforms import class_ratios, preprocessing

from .conftest import compose_config, tiny_synthetic_overrides

GPU_FALLBACK = (
    "data.cache=gpu needs a CUDA GPU and none is available: holding the preprocessed training "
    "cases in CPU memory instead (data.cache=memory)"
)


def datamodule(tmp_path, task_dir, overrides=()):
    cfg = compose_config(tmp_path, [*tiny_synthetic_overrides(), *overrides], data_dir=task_dir.parent)
    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def draw(dm, epochs: int) -> list[dict]:
    return [batch for _ in range(epochs) for batch in dm.train_dataloader()]


def test_class_ratios_give_background_neg_and_share_pos_among_the_classes():
    assert class_ratios([1, 1], 3) == [1, 0.5, 0.5]
    assert class_ratios([2, 1], 2) == [1, 2.0]


@pytest.mark.parametrize("cache", ["memory", "disk", "auto"])
def test_batches_hold_plain_image_and_label_patches_only(tmp_path, synthetic_task_dir, cache):
    dm = datamodule(tmp_path, synthetic_task_dir, [f"data.cache={cache}", "task.patch_size=[16,16,16]"])
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "label"}  # the cached crop centres stay out of the batch
    for value in batch.values():
        assert type(value) is torch.Tensor and value.shape == (2, 1, 16, 16, 16)
        assert value.dtype == torch.float32


def test_store_holds_a_bounded_number_of_crop_centres_per_class(tmp_path, synthetic_task_dir):
    dm = datamodule(tmp_path, synthetic_task_dir, ["data.crop_centres_per_class=50"])
    for case in dm.train_set.cases:
        centres, start, end = case.centres()
        label = case.arrays(mmap=True)[1][tuple(slice(a, b) for a, b in zip(start, end, strict=True))]
        assert len(centres) == 3  # background, organ_a, organ_b
        assert all(0 < len(c) <= 50 for c in centres)
        for value, c in enumerate(centres):  # every candidate lies in its class
            assert (label.flatten()[c] == value).all()


def test_foreground_only_patches_all_contain_foreground(tmp_path, synthetic_task_dir):
    dm = datamodule(
        tmp_path,
        synthetic_task_dir,
        ["task.patch_size=[8,8,8]", "data.pos_neg_ratio=[1,0]", "data.augment=false"],
    )
    patches = [label for batch in draw(dm, 10) for label in batch["label"]]
    assert len(patches) == 10 * 2 * len(dm.train_cases)
    assert all((label > 0).any() for label in patches)


def test_many_augmented_draws_leave_the_held_cases_bit_identical(tmp_path, synthetic_task_dir):
    dm = datamodule(tmp_path, synthetic_task_dir, ["task.patch_size=[16,16,16]", "data.cache=memory"])
    assert dm.train_set.hold == "memory"
    before = copy.deepcopy(dm.train_set.held)
    batches = draw(dm, 50)
    assert len(batches) == 50 * len(dm.train_cases)
    assert not torch.equal(batches[0]["image"], batches[1]["image"])  # the draws did differ
    for held, original in zip(dm.train_set.held, before, strict=True):
        assert all(torch.equal(now, then) for now, then in zip(held, original, strict=True))


def test_memory_and_disk_draw_the_same_patches(tmp_path, synthetic_task_dir):
    """The same seed draws the same patches whether the cases are held or read from the store."""
    drawn = {}
    for cache in ("memory", "disk"):
        torch.manual_seed(0), np.random.seed(0)
        dm = datamodule(tmp_path, synthetic_task_dir, [f"data.cache={cache}", "task.patch_size=[16,40,16]"])
        drawn[cache] = [dm.train_set[i] for i in range(len(dm.train_set))]
    for held, read in zip(drawn["memory"], drawn["disk"], strict=True):
        for a, b in zip(held, read, strict=True):
            assert a["image"].shape == a["label"].shape == (1, 16, 40, 16)  # padded where wider than 32
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_foreground_crop_trims_training_patches_only(tmp_path, synthetic_task_dir):
    dm = datamodule(
        tmp_path,
        synthetic_task_dir,
        ["task.crop_foreground=true", "task.patch_size=[8,8,8]", "data.augment=false", "data.cache=disk"],
    )
    whole = Compose(preprocessing(dm.task))
    for case, stored in zip(dm.train_cases, dm.train_set.cases, strict=True):
        _, start, end = stored.centres()
        full = whole(dict(case))
        inside = full["image"][(slice(None), *(slice(a, b) for a, b in zip(start, end, strict=True)))]
        assert inside.numel() < full["image"].numel()  # the zero background around the body went
        assert (full["label"][0][tuple(slice(a, b) for a, b in zip(start, end, strict=True))] > 0).sum() == (
            full["label"] > 0
        ).sum()  # every labelled voxel is inside
    for val, case in zip(dm.val_set, dm.val_cases, strict=True):  # validation reads whole volumes
        assert torch.allclose(val["image"], whole(dict(case))["image"].as_tensor())


def test_thread_loader_prefetches_the_same_kind_of_batches(tmp_path, synthetic_task_dir):
    dm = datamodule(tmp_path, synthetic_task_dir, ["data.loader=thread"])
    assert isinstance(dm.train_dataloader(), ThreadDataLoader)
    assert isinstance(dm.val_dataloader(), ThreadDataLoader)
    batches = draw(dm, 2)
    assert len(batches) == 2 * len(dm.train_cases)  # one volume, two patches per batch
    assert all(set(b) == {"image", "label"} and b["image"].shape == (2, 1, 32, 32, 32) for b in batches)


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [("cache", "ram", "auto, memory, disk, gpu"), ("loader", "process", "torch, thread")],
)
def test_unknown_cache_or_loader_is_refused(tmp_path, key, value, allowed):
    cfg = compose_config(tmp_path, tiny_synthetic_overrides())
    with pytest.raises(ValueError, match=rf"data\.{key} must be one of {allowed}, got '{value}'"):
        MSDDataModule(str(tmp_path), cfg.task, **{key: value})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without a CUDA GPU")
def test_gpu_cache_without_cuda_falls_back_to_memory_with_one_warning(tmp_path, synthetic_task_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="lightning_seg.data.datamodule"):
        dm = datamodule(tmp_path, synthetic_task_dir, ["data.cache=gpu"])
        batch = next(iter(dm.train_dataloader()))
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [GPU_FALLBACK]
    assert dm.cache == "memory" and dm.train_set.hold == "memory"
    assert isinstance(dm.train_dataloader(), DataLoader) and batch["image"].device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is available")
def test_gpu_cache_draws_batches_on_the_gpu(tmp_path, synthetic_task_dir):
    dm = datamodule(tmp_path, synthetic_task_dir, ["data.cache=gpu", "data.num_workers=2"])
    image, label = dm.train_set.held[0]
    assert image.device.type == "cuda" and label.device.type == "cuda"
    loader = dm.train_dataloader()
    assert isinstance(loader, ThreadDataLoader) and loader.num_workers == 0 and not loader.pin_memory
    batches = draw(dm, 3)
    assert len(batches) == 3 * len(dm.train_cases)
    for batch in batches:
        assert set(batch) == {"image", "label"}
        assert batch["image"].device.type == "cuda" and batch["label"].device.type == "cuda"
        assert batch["image"].shape == (2, 1, 32, 32, 32)
    # validation volumes stay in CPU memory
    assert next(iter(dm.val_dataloader()))["image"].device.type == "cpu"


@pytest.mark.parametrize(("share", "hold"), [(0.125, "memory"), (1e-9, "disk")])
def test_auto_holds_small_datasets_in_memory_and_reads_large_ones_from_disk(
    tmp_path, synthetic_task_dir, share, hold
):
    dm = datamodule(tmp_path, synthetic_task_dir, [f"data.memory_share={share}"])
    source = dm.choose_cache()
    assert dm.cache == "auto" and source["cache"] == dm.train_set.hold == hold
    assert f"data.memory_share={share} of the host memory per process" in source["reason"]
    assert ("memory-mapped store" in source["reason"]) == (hold == "disk")
    assert source["store"] == str(dm.store.path) and source["training_gib"] > 0


def test_points_starting_together_write_the_synthetic_task_once_and_all_read_it_whole(tmp_path, caplog):
    """A sweep's points share paths.data_dir: one writes the task folder, the others wait for it (a point
    reading files another was still writing failed the SLURM sweep with `not a gzip file`)."""
    cfg = compose_config(tmp_path, tiny_synthetic_overrides())
    caplog.set_level(logging.INFO, "lightning_seg.data.datamodule")
    with ThreadPoolExecutor(3) as pool:  # an flock excludes threads too: each opens the lock file itself
        checked = list(pool.map(lambda _: instantiate(cfg.data).check(), range(3)))
    assert [len(cases) for cases in checked] == [6, 6, 6]
    assert sum("writing the synthetic task" in r.getMessage() for r in caplog.records) == 1
    # a task of the user's own naming that folder (a planned task) reads it, lock file beside it or not
    mine = compose_config(tmp_path, [*tiny_synthetic_overrides(), "task.synthetic=null"])
    assert len(instantiate(mine.data).check()) == 6
