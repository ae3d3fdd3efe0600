"""Own data: both layouts, the fingerprint and plan of lightning-seg-new-task, and odd datasets that
either train from the planned config or stop with one error line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from monai.transforms import Compose

from lightning_seg.config import CONFIG_DIR
from lightning_seg.data.checks import check_dataset
from lightning_seg.data.layout import read_datalist
from lightning_seg.data.synthetic import write_synthetic_msd, write_synthetic_nnunet
from lightning_seg.data.transforms import preprocessing
from lightning_seg.new_task.fingerprint import fingerprint

from .conftest import ROOT, SHARED_DATA, needs_shared_data

FAST = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "hardware=cpu"]


def new_task(tmp_path: Path, folder: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_seg.new_task",
            str(folder),
            *options,
            f"config_dir={tmp_path / 'conf'}",
            f"cache_dir={tmp_path / 'cache'}",  # the dataset check's memo, where train() below looks
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )


def train(tmp_path: Path, *overrides: str, command=("train.py",)) -> subprocess.CompletedProcess:
    env = {**os.environ, "LIGHTNING_SEG_CONFIG_DIR": str(tmp_path / "conf")}
    paths = [f"paths.log_dir={tmp_path / 'outputs'}", f"paths.cache_dir={tmp_path / 'cache'}"]
    if command != ("train.py",):
        paths = [f"hydra.run.dir={tmp_path / 'command'}"]
    return subprocess.run(
        [sys.executable, *command, *paths, *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def planned(tmp_path: Path, name: str) -> dict:
    return yaml.safe_load((tmp_path / "conf" / "task" / f"{name}.yaml").read_text())


def test_both_layouts_read_the_same_cases(tmp_path):
    msd = write_synthetic_msd(tmp_path / "Task00_Synthetic", num_cases=3, shape=(24, 24, 16))
    raw = tmp_path / "Dataset001_Synthetic"
    script = ROOT / "docs" / "results" / "own_data" / "msd_to_nnunet.py"
    subprocess.run([sys.executable, str(script), str(msd), str(raw)], check=True, capture_output=True)
    (raw / "imagesTr" / "._synthetic_000_0000.nii.gz").write_bytes(b"\0" * 4096)  # macOS' companion file
    task = {"orientation": "RAS", "spacing": [1.5, 1.5, 2.0], "normalization": {"kind": "zscore_nonzero"}}
    for a, b in zip(read_datalist(msd), read_datalist(raw), strict=True):
        assert Path(a["label"]).name == Path(b["label"]).name
        assert isinstance(b["image"], list) and b["image"][0].endswith("_0000.nii.gz")
        x, y = (Compose(preprocessing(task))(case) for case in (a, b))
        assert x["image"].shape == y["image"].shape == (1, 24, 24, 16)
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["label"], y["label"])
    assert len(check_dataset(raw, ["background", "organ_a", "organ_b"], 1)) == 3


def test_fingerprint_of_known_spacings_and_intensities_gives_the_known_plan(tmp_path):
    # six CT cases, 0.8 mm in-plane, slices 3-6 mm thick: z is "thick" (4.5 > 3 x 0.8 mm, 12 voxels < 64 / 3)
    thick = [3.0, 3.0, 4.0, 5.0, 5.0, 6.0]
    cases = [((64, 64, 12), (0.8, 0.8, z)) for z in thick]
    folder = write_synthetic_nnunet(
        tmp_path / "Dataset002_CT", cases, {"0": "CT"}, {"background": 0, "a": 1, "b": 2}, ct=True
    )
    prints = fingerprint(read_datalist(folder))
    stats = prints["foreground_intensities"][0]
    values = 40 + 10 * np.arange(6)  # every case contributes equally, whatever its foreground size
    assert stats["mean"] == pytest.approx(values.mean()) and stats["std"] == pytest.approx(values.std())
    assert (stats["percentile_00_5"], stats["percentile_99_5"]) == (40, 90)

    result = new_task(tmp_path, folder, "name=ct_known", "gpu=cpu")
    assert result.returncode == 0, result.stderr
    task = planned(tmp_path, "ct_known")
    # the 10th percentile of the thick axis (3.0 mm), not its median (4.5 mm)
    assert task["task"]["spacing"] == [0.8, 0.8, 3.0]
    expected = {"kind": "ct_zscore", "a_min": 40.0, "a_max": 90.0, "mean": 65.0, "std": values.std()}
    assert task["task"]["normalization"] == pytest.approx(expected)
    # median size at 3 mm: 64 x 64 x 18 (12 slices x 3-6 mm / 3); z halves twice, x and y four times
    assert task["task"]["patch_size"] == [64, 64, 20]
    assert task["data"]["batch_size"] == 8  # 716800 voxels // (64 * 64 * 20), the CPU's most
    # the phantom's organ a lies on the +x side of the body, organ b on the -x side: x is not mirrored
    assert task["data"]["flip_axes"] == [1, 2] and "labels 1, 2 keep their order along LR" in result.stdout
    assert "override /model: monai_unet" in (tmp_path / "conf" / "task" / "ct_known.yaml").read_text()
    assert "axis 2 is thick" in result.stdout and "task.spacing: [0.8, 0.8, 3.0]" in result.stdout
    assert (tmp_path / "conf" / "task" / "ct_known.fingerprint.json").is_file()


def test_gpu_plan_sizes_patch_and_batch_for_the_card_and_composes(tmp_path):
    write_synthetic_msd(tmp_path / "Task00_Mine", num_cases=10, shape=(48, 48, 32))
    result = new_task(tmp_path, tmp_path / "Task00_Mine", "name=mine", "gpu_memory_gib=8", "precision=bf16")
    assert result.returncode == 0, result.stderr
    task = planned(tmp_path, "mine")
    # the phantom's zero background: z-score and crop to the non-zero box (about 38 x 39 x 26 voxels)
    assert task["task"]["normalization"] == {"kind": "zscore_nonzero"} and task["task"]["crop_foreground"]
    assert task["precision"] == "bf16" and task["task"]["patch_size"] == [40, 40, 28]
    # hundreds fit 8 GB and 8 training cases x 2 patches feed 16, but 5% of the dataset's voxels is under
    # one patch: nnU-Net's least batch, 2
    assert task["data"]["batch_size"] == 2
    assert "fit a 8 GB card in bf16 AMP" in result.stdout
    assert "model: dynunet" in (tmp_path / "conf" / "task" / "mine.yaml").read_text()
    os.environ["LIGHTNING_SEG_CONFIG_DIR"] = str(tmp_path / "conf")
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("train", overrides=["task=mine"])
    finally:
        del os.environ["LIGHTNING_SEG_CONFIG_DIR"]
    assert cfg.data.task_dir == str(tmp_path / "Task00_Mine")
    assert cfg.model._target_.endswith("dynunet") and cfg.precision == "bf16"
    # the cuDNN allowance alone (0.5 GiB) leaves no room on a 0.6 GB card
    small = new_task(tmp_path, tmp_path / "Task00_Mine", "name=mine", "gpu_memory_gib=0.6")
    assert (
        small.returncode == 2 and "error: no patch of the median image's aspect fits batch 2" in small.stderr
    )


def test_two_channel_regions_train_validate_and_predict_in_their_own_geometry(tmp_path):
    labels = {"background": 0, "whole": [1, 2, 3, 4], "core": [2, 3, 4], "enhancing": 3, "necrosis": 4}
    cases = [((40, 36, 28), (1.0, 1.2, 1.5))] * 4
    folder = write_synthetic_nnunet(
        tmp_path / "Dataset003_Tumour", cases, {"0": "FLAIR", "1": "T1"}, labels, num_labels=5
    )
    result = new_task(tmp_path, folder, "name=tumour", "gpu=cpu")
    assert result.returncode == 0, result.stderr
    task = planned(tmp_path, "tumour")["task"]
    assert task["in_channels"] == 2
    assert task["labels"] == ["background", "label_1", "label_2", "enhancing", "necrosis"]
    assert task["regions"] == {"whole": [1, 2, 3, 4], "core": [2, 3, 4], "enhancing": [3], "necrosis": [4]}
    run = tmp_path / "run"
    trained = train(tmp_path, "task=tumour", "trainer.max_epochs=1", "task.val_every_n_epochs=1", *FAST,
                    f"hydra.run.dir={run}")  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    metrics = "".join(p.read_text() for p in run.rglob("metrics.csv"))
    assert "val/dice_whole" in metrics and "val/dice_necrosis" in metrics
    out = tmp_path / "pred"
    ckpt = run / "checkpoints" / "last.ckpt"
    predicted = train(tmp_path, f"ckpt_path={ckpt}", f"input={folder / 'imagesTr'}", f"output={out}",
                      command=("-m", "lightning_seg.predict"))  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr[-3000:]
    written = nib.load(out / "case00.nii.gz")
    source = nib.load(folder / "imagesTr" / "case00_0000.nii.gz")
    assert written.shape == source.shape and np.allclose(written.affine, source.affine)


def test_odd_geometry_plans_and_trains(tmp_path):
    # thick-slice MRI with a different slice count per case and a 10x spread of slice thickness
    cases = [((48, 48, n), (0.9, 0.9, z)) for n, z in [(8, 6.0), (12, 4.0), (20, 2.4), (60, 0.6), (10, 5.0)]]
    folder = write_synthetic_nnunet(
        tmp_path / "Dataset004_Thick", cases, {"0": "T2"}, {"background": 0, "a": 1, "b": 2}
    )
    result = new_task(tmp_path, folder, "name=thick", "gpu=cpu")
    assert result.returncode == 0, result.stderr
    assert "(spacing spread)" in result.stdout and "10.0x between cases" in result.stdout
    run = tmp_path / "run"
    trained = train(tmp_path, "task=thick", "trainer.max_epochs=1", "task.val_every_n_epochs=1", *FAST,
                    f"hydra.run.dir={run}")  # fmt: skip
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert list((run / "checkpoints").glob("best-*.ckpt"))


def test_one_case_plans_and_trains_on_it(tmp_path):
    labels = {"background": 0, "a": 1, "b": 2}
    folder = write_synthetic_nnunet(
        tmp_path / "Dataset005_One", [((32, 32, 24), (1.0, 1.0, 1.0))], {"0": "T1"}, labels
    )
    result = new_task(tmp_path, folder, "name=one", "gpu=cpu")
    assert result.returncode == 0, result.stderr
    assert "trains and validates on that case" in result.stdout
    assert planned(tmp_path, "one")["data"]["batch_size"] == 2  # one volume, two patches
    assert list(
        (tmp_path / "cache" / "checked").glob("Dataset005_One-*.json")
    )  # training reads it, no re-check
    trained = train(tmp_path, "task=one", "trainer.max_steps=2", *FAST, f"hydra.run.dir={tmp_path / 'run'}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize(
    "break_it, message",
    [
        ("missing_channel", "case case01 has case01_0000.nii.gz, but dataset.json declares 2 channel(s)"),
        ("num_training", "numTraining is 9, but imagesTr/ holds 3 case(s)"),
        ("gaps_in_labels", "label values [0, 1, 3] are not consecutive from 0"),
        ("shipped_name", "name=hippocampus: the hand-written"),
    ],
)
def test_odd_datasets_stop_with_one_error_line(tmp_path, break_it, message):
    cases = [((24, 24, 16), (1.0, 1.0, 1.0))] * 3
    folder = write_synthetic_nnunet(
        tmp_path / "Dataset006_Odd", cases, {"0": "T1", "1": "T2"}, {"background": 0, "a": 1, "b": 2}
    )
    meta = json.loads((folder / "dataset.json").read_text())
    name = "odd"
    if break_it == "missing_channel":
        (folder / "imagesTr" / "case01_0001.nii.gz").unlink()
    elif break_it == "num_training":
        meta["numTraining"] = 9
    elif break_it == "gaps_in_labels":
        meta["labels"] = {"background": 0, "a": 1, "b": 3}
    else:
        name = "hippocampus"
    (folder / "dataset.json").write_text(json.dumps(meta))
    result = new_task(tmp_path, folder, f"name={name}", "gpu=cpu")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
    if break_it == "missing_channel":  # training on the folder with a hand-written task says the same
        hand_written = ["task=hippocampus", f"task.msd_folder={folder}", "task.in_channels=2"]
        assert message in train(tmp_path, *hand_written, "trainer.fast_dev_run=true", *FAST).stderr


def test_a_case_with_a_different_channel_count_is_named(tmp_path):
    task = write_synthetic_msd(tmp_path / "Task00_Two", num_cases=3, shape=(24, 24, 16))
    meta = json.loads((task / "dataset.json").read_text())
    meta["modality"] = {"0": "T1", "1": "T2"}
    (task / "dataset.json").write_text(json.dumps(meta))
    for i, entry in enumerate(meta["training"]):
        img = nib.load(task / entry["image"])
        data = np.asanyarray(img.dataobj)
        stacked = np.stack([data, data], -1) if i != 1 else data  # case 1 keeps one channel
        nib.save(nib.Nifti1Image(stacked, img.affine), task / entry["image"])
    result = new_task(tmp_path, task, "name=two", "gpu=cpu")
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr
    assert "synthetic_001.nii.gz: shape (24, 24, 16), expected 3D with 2 channel(s) in dim 4" in result.stderr


@needs_shared_data
def test_hippocampus_in_both_layouts_plans_the_same(tmp_path):
    raw = tmp_path / "Dataset004_Hippocampus"
    script = ROOT / "docs" / "results" / "own_data" / "msd_to_nnunet.py"
    source = SHARED_DATA / "Task04_Hippocampus"
    subprocess.run(
        [sys.executable, str(script), str(source), str(raw), "--link"], check=True, capture_output=True
    )
    plans = []
    for folder, name in ((source, "hippo_msd"), (raw, "hippo_raw")):
        result = new_task(tmp_path, folder, f"name={name}", "gpu=cpu")
        assert result.returncode == 0, result.stderr
        plans.append(planned(tmp_path, name))
    for plan in plans:
        del plan["task"]["name"], plan["task"]["msd_folder"]
    assert plans[0] == plans[1]
    task = plans[0]["task"]  # what the hand-written hippocampus config has, but normalization (see README)
    assert (task["spacing"], task["patch_size"], plans[0]["data"]["batch_size"]) == (
        [1.0, 1.0, 1.0],
        [40, 56, 40],
        8,
    )
    assert task["normalization"] == {"kind": "zscore"} and task["val_every_n_epochs"] == 2
    assert plans[0]["data"]["flip_axes"] == [0]  # anterior before posterior along PA (and IS) in every case


@pytest.mark.parametrize(
    "options, message",
    [
        (["name=a/b"], "name=a/b: use letters, digits, _ and -"),
        (["name=x", "gpu_memory_gib=lots"], "gpu_memory_gib=lots: give the card's memory in GiB"),
        (["name=x", "gpu=GTX480"], "gpu=GTX480: choose cpu or one of V100-16"),
        (["name=x", "gpu=cpu", "precision=8"], "precision=8: choose one of 32, tf32, 16, bf16"),
        (["name=x", "batch=4"], "unknown option(s) batch; usage: lightning-seg-new-task DIR name=NAME"),
        ([], "give one DIR and name=NAME"),
    ],
)
def test_bad_options_stop_before_the_folder_is_read(tmp_path, options, message):
    result = new_task(tmp_path, tmp_path / "not_read", *options)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and message in result.stderr, (
        result.stderr
    )
    assert "Traceback" not in result.stderr and not (tmp_path / "conf").exists()
