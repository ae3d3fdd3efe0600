"""The accuracy recipe: budget-aware learning rate, recipes, folds, ensembles, one Dice rule."""

import math

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate

from lightning_seg.data.datamodule import split_cases
from lightning_seg.inference import Predictor
from lightning_seg.scoring import score_files, summarize
from lightning_seg.training import train

from .conftest import compose_config, tiny_synthetic_overrides


def learning_rates(run_dir) -> pd.Series:
    log = pd.read_csv(run_dir / "csv" / "metrics.csv")
    return log.dropna(subset=["lr-Adam"]).set_index("step")["lr-Adam"]


def test_linear_schedule_reaches_zero_when_the_step_budget_ends(tmp_path):
    overrides = ["optimizer.schedule=linear", "trainer.max_steps=12", "trainer.log_every_n_steps=1"]
    train(compose_config(tmp_path, [*tiny_synthetic_overrides(), *overrides]))
    lr = learning_rates(tmp_path / "run")
    assert list(lr.index) == list(range(12))
    assert lr.iloc[0] == pytest.approx(1e-3) and lr.iloc[-1] == pytest.approx(1e-3 / 12)
    assert lr.is_monotonic_decreasing


def test_time_budget_takes_over_from_epochs_and_the_rate_ends_near_zero(tmp_path):
    overrides = [
        "optimizer.schedule=poly",
        "trainer.max_time=00:00:00:20",
        "trainer.log_every_n_steps=1",
        "task.max_epochs=1",  # the task's cap: max_time takes precedence
    ]
    cfg = compose_config(tmp_path, [*tiny_synthetic_overrides(), *overrides])
    assert cfg.trainer.max_epochs == -1
    _, objects = train(cfg)
    assert objects["trainer"].current_epoch > 1  # trained past the task's epoch cap, until the clock
    lr = learning_rates(tmp_path / "run")
    assert lr.iloc[0] == pytest.approx(1e-3, rel=0.05)
    assert lr.iloc[-1] < 0.15e-3 and lr.is_monotonic_decreasing


def test_folds_are_disjoint_cover_every_case_and_keep_the_test_cases():
    cases = [{"image": f"case_{i}.nii.gz", "label": f"label_{i}.nii.gz"} for i in range(23)]
    plain_train, plain_val, plain_test = split_cases(cases, 0.2, 0.2, seed=3)
    folds = [split_cases(cases, 0.2, 0.2, seed=3, num_folds=5, fold=k) for k in range(5)]
    vals = [[c["image"] for c in val] for _, val, _ in folds]
    non_test = {c["image"] for c in plain_train + plain_val}
    assert sorted(sum(vals, [])) == sorted(non_test)  # every case validates exactly once
    assert {len(v) for v in vals} == {3, 4}
    for train_cases, val, test in folds:
        assert test == plain_test  # held out first, the same for every fold
        assert {c["image"] for c in train_cases} == non_test - {c["image"] for c in val}


def test_ensemble_of_two_checkpoints_averages_their_probabilities(tmp_path):
    checkpoints = []
    for seed in (0, 1):
        cfg = compose_config(
            tmp_path / str(seed),
            [*tiny_synthetic_overrides(), "trainer.max_epochs=1", f"seed={seed}"],
            data_dir=tmp_path / "data",
        )
        train(cfg)
        checkpoints.append(tmp_path / str(seed) / "run" / "checkpoints" / "last.ckpt")
    image = sorted((tmp_path / "data" / "Task00_Synthetic" / "imagesTr").iterdir())[0]
    _, first = Predictor(checkpoints[0], device="cpu").predict(image)
    _, second = Predictor(checkpoints[1], device="cpu").predict(image)
    labels, both = Predictor(checkpoints, device="cpu").predict(image)
    assert not torch.allclose(first, second, atol=1e-3)  # two different networks
    assert torch.allclose(both, (first + second) / 2, atol=1e-5)
    assert torch.equal(labels, both.argmax(0).to(torch.uint8))


@pytest.mark.parametrize("regions", [None, {"tumour": [1, 2], "core": [2]}], ids=["labels", "regions"])
def test_evaluate_and_val_dice_agree_on_a_case_without_one_label(tmp_path, regions):
    """Case 1 has no organ_b in reference or prediction: both leave it out of organ_b's mean (or
    the region holding only organ_b); with regions both score the unions of labels."""
    ref1 = np.zeros((8, 8, 8), np.uint8)
    ref1[:4] = 1
    pred1 = ref1.copy()
    pred1[:1] = 0
    ref2 = np.zeros((8, 8, 8), np.uint8)
    ref2[:2], ref2[4:6] = 1, 2
    pred2 = np.zeros((8, 8, 8), np.uint8)
    pred2[:3], pred2[5:7] = 1, 2
    pairs = []
    for i, (pred, ref) in enumerate([(pred1, ref1), (pred2, ref2)]):
        for kind, array in (("pred", pred), ("ref", ref)):
            (tmp_path / kind).mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(array, np.eye(4)), tmp_path / kind / f"case_{i}.nii.gz")
        pairs.append((tmp_path / "pred" / f"case_{i}.nii.gz", tmp_path / "ref" / f"case_{i}.nii.gz"))
    labels = ["background", "organ_a", "organ_b"]
    summary = summarize(score_files(pairs, labels, regions), labels, regions)

    as_override = f"+task.regions={regions}".replace("'", "")
    overrides = tiny_synthetic_overrides() + ([as_override] if regions else [])
    module = instantiate(compose_config(tmp_path, overrides).module)  # training's metric
    for pred, ref in [(pred1, ref1), (pred2, ref2)]:
        module.update_val_dice(torch.from_numpy(pred)[None].long(), torch.from_numpy(ref)[None].long())
    per_structure = module.val_dice.compute()
    first, second = regions or ["organ_a", "organ_b"]
    assert list(summary["labels"]) == [first, second] == list(module.structures)
    assert summary["labels"][second]["scored"] == 1
    assert summary["labels"][second]["dice"]["mean"] == pytest.approx(float(per_structure[1]))
    assert summary["labels"][first]["dice"]["mean"] == pytest.approx(float(per_structure[0]))
    assert summary["foreground_mean_dice"] == pytest.approx(float(per_structure.nanmean()))
    assert not math.isclose(summary["labels"][second]["dice"]["mean"], 0.75)  # not counted as 1
    if regions:  # by hand, in slices: tumour 3 of 4 and 3 (pred) -> 6/7; 3 of 4 and 5 -> 6/9
        assert summary["scored_by"] == "regions"
        assert summary["labels"]["tumour"]["dice"]["mean"] == pytest.approx((6 / 7 + 6 / 9) / 2)
        assert summary["labels"]["core"]["dice"]["mean"] == pytest.approx(0.5)


def test_nnunet_recipe_trains_on_augmented_patches(tmp_path):
    cfg = compose_config(tmp_path, [*tiny_synthetic_overrides(), "recipe=nnunet", "trainer.max_epochs=1"])
    assert cfg.loss._target_ == "monai.losses.DiceCELoss" and cfg.trainer.gradient_clip_val == 12
    metrics, objects = train(cfg)
    datamodule = objects["datamodule"]
    names = [type(t).__name__ for t in datamodule.train_set.transform.transforms]
    assert {"RandAffined", "RandSimulateLowResolutiond", "RandAdjustContrastd"} <= set(names)
    batch = next(iter(datamodule.train_dataloader()))
    assert tuple(batch["image"].shape[2:]) == (32, 32, 32)
    assert set(batch["label"].unique().tolist()) <= {0.0, 1.0, 2.0}  # nearest: labels stay labels
    assert torch.isfinite(batch["image"]).all() and math.isfinite(metrics["train/loss_step"])
