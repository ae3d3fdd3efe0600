"""Segmentation pictures at every validation: PNGs in the run dir and W&B images with masks."""

import json
import re

import matplotlib.image as mpimg
import numpy as np

from lightning_seg.study.callbacks.val_images import busiest_slices
from lightning_seg.training import train

from .conftest import compose_config, tiny_synthetic_overrides
from .test_time_to_accuracy import wandb_records


def test_slice_with_most_reference_foreground_along_each_axis():
    reference = np.zeros((10, 12, 8), dtype=np.uint8)
    reference[3, 2:5, 1:3] = 1  # 6 voxels in x-slice 3, 2 in each of y-slices 2..4, 3 in z-slices 1, 2
    reference[7, 9, 6] = 2
    assert busiest_slices(reference) == [3, 2, 1]  # ties: the first
    assert busiest_slices(np.zeros_like(reference)) == [5, 6, 4]  # no foreground: the middle


def test_pictures_in_the_run_dir_and_the_offline_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_config(
        tmp_path,
        [
            *tiny_synthetic_overrides(),
            "task.synthetic.num_cases=10",  # 2 validation cases
            "trainer.max_epochs=2",
            "logger=wandb",
            "logger.wandb.group=test",
            "callbacks.val_images.count=3",  # more than there are: every validation case
        ],
    )
    train(cfg)
    run = tmp_path / "run"
    split = json.loads((run / "split.json").read_text())
    cases = sorted(c["image"].rsplit("/", 1)[-1].removesuffix(".nii.gz") for c in split["val"])
    assert len(cases) == 2
    pictures = sorted(p.name for p in (run / "val_images").iterdir())
    # the sanity check draws nothing; each of the two validations draws each case
    names = [re.fullmatch(r"epoch(\d{4})-step(\d{6})-(.+)\.png", p).groups() for p in pictures]
    assert sorted((int(e), c) for e, _, c in names) == [(e, c) for e in (0, 1) for c in cases]
    steps = sorted({int(s) for _, s, _ in names})
    assert len(steps) == 2 and steps[1] == 2 * steps[0]  # the steps taken by the end of each epoch
    image = mpimg.imread(run / "val_images" / pictures[0])
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100

    (wandb_dir,) = (run / "wandb").glob("offline-run-*")
    media = wandb_dir / "files" / "media" / "images"
    assert len(list(media.glob("val_images_*.png"))) == 4  # 2 cases x 2 validations
    assert len(list((media / "mask").glob("val_images_*.mask.png"))) == 8  # prediction + reference each
    (records_file,) = wandb_dir.glob("run-*.wandb")
    records = wandb_records(records_file)
    logged = [r["history"]["item"] for r in records if r["type"] == "history"]
    logged = [item for item in logged if "val_images._type" in item]
    assert len(logged) == 2
    for item in logged:
        assert item["val_images._type"] == "images/separated"
        assert sorted(item["val_images.captions"]) == cases
        for masks in item["val_images.all_masks"]:
            assert set(masks) == {"prediction", "ground_truth"}
            assert all(
                m["_type"] == "mask" and (wandb_dir / "files" / m["path"]).is_file() for m in masks.values()
            )
    class_labels = {}
    for record in records:
        if record["type"] == "config":
            class_labels.update(record["config"]["update"].get("_wandb", {}).get("mask/class_labels", {}))
    labels = {"0": "background", "1": "organ_a", "2": "organ_b"}
    assert {k: v["value"] for k, v in class_labels.items()} == {
        "val_images_wandb_delimeter_prediction": labels,
        "val_images_wandb_delimeter_ground_truth": labels,
    }
