"""Prediction on new volumes (geometry kept exactly) and evaluation against references."""

import json
import math
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lightning_seg.data.synthetic import synthetic_case, write_synthetic_msd
from lightning_seg.errors import InputError
from lightning_seg.inference import Predictor
from lightning_seg.predict import predict_files
from lightning_seg.scoring import score_case, score_files, summarize
from lightning_seg.training import train

from .conftest import (
    SHARED_DATA,
    compose_config,
    learnable_synthetic_overrides,
    needs_shared_data,
    tiny_synthetic_overrides,
)
from .test_distributed import validate_with

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """A model trained briefly on the synthetic task, with a fifth of the cases held out."""
    tmp = tmp_path_factory.mktemp("trained")
    cfg = compose_config(
        tmp, [*learnable_synthetic_overrides(), "trainer.max_epochs=20", "data.test_fraction=0.2"]
    )
    metrics, _ = train(cfg)
    best = next((tmp / "run" / "checkpoints").glob("best-*.ckpt"))
    return {"run": tmp / "run", "ckpt": best, "data": tmp / "data" / "Task00_Synthetic", "metrics": metrics}


def evaluate_split(run: dict, split: str, out: Path) -> None:
    """`python -m lightning_seg.evaluate` on one split of the trained run's cases."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_seg.evaluate",
            f"ckpt_path={run['ckpt']}",
            f"task_dir={run['data']}",
            f"split={split}",
            f"output={out}",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )


def test_model_card_sits_next_to_the_best_checkpoint(synthetic_run):
    card = json.loads((synthetic_run["ckpt"].parent / "model_card.json").read_text())
    assert card["checkpoint"] == synthetic_run["ckpt"].name
    assert card["task"]["labels"] == ["background", "organ_a", "organ_b"]
    assert card["preprocessing"]["spacing"] == [1.5, 1.5, 2.0]
    assert card["validation"]["best"] == pytest.approx(synthetic_run["metrics"]["best/val_dice"])
    assert card["data"]["test_cases"] == 3 and card["environment"]["torch"]
    assert card["weight_average"]["decay"] == 0.999


def test_prediction_keeps_shape_and_affine_of_a_rotated_anisotropic_non_ras_image(synthetic_run, tmp_path):
    image, _ = synthetic_case((36, 30, 20), 3, np.random.default_rng(7))
    # LPS-like axes, permuted, anisotropic voxels, a small rotation and an offset
    angle = math.radians(10)
    rotation = np.array(
        [[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.array([[0, -1.2, 0], [-0.9, 0, 0], [0, 0, 2.5]])
    affine[:3, 3] = [40.0, -12.5, 7.0]
    source = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), source)
    assert nib.aff2axcodes(affine) != ("R", "A", "S")
    [written] = predict_files(Predictor(synthetic_run["ckpt"]), [source], tmp_path / "out")
    result = nib.load(written)
    assert written.name == "case.nii.gz"
    assert result.shape == image.shape
    assert np.array_equal(result.affine, nib.load(source).affine)
    assert set(np.unique(np.asarray(result.dataobj))) <= {0, 1, 2}


def test_trained_model_segments_unseen_synthetic_cases(synthetic_run, tmp_path):
    unseen = write_synthetic_msd(tmp_path / "Task00_Unseen", num_cases=4, shape=(40, 40, 32), seed=123)
    images = sorted((unseen / "imagesTr").glob("*.nii.gz"))
    predictions = predict_files(Predictor(synthetic_run["ckpt"], mirror=True), images, tmp_path / "pred")
    scores = score_files([(p, unseen / "labelsTr" / p.name) for p in predictions], ["background", "a", "b"])
    assert summarize(scores, ["background", "a", "b"])["foreground_mean_dice"] >= 0.7


def test_evaluate_cli_scores_the_held_out_split_of_a_run(synthetic_run, tmp_path):
    out = tmp_path / "eval"
    evaluate_split(synthetic_run, "test", out)
    held_out = {
        Path(c["image"]).name for c in json.loads((synthetic_run["run"] / "split.json").read_text())["test"]
    }
    per_case = (out / "per_case.csv").read_text().splitlines()
    assert {line.split(",")[0] for line in per_case[1:]} == held_out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["cases"] == 3 and summary["foreground_mean_dice"] >= 0.7
    assert "foreground mean" in (out / "summary.md").read_text()
    # the predictions it scored have the references' grids
    for name in held_out:
        assert (
            nib.load(out / "predictions" / name).shape
            == nib.load(synthetic_run["data"] / "labelsTr" / name).shape
        )


def test_predict_cli_writes_a_label_per_input(synthetic_run, tmp_path):
    images = synthetic_run["data"] / "imagesTr"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_seg.predict",
            f"ckpt_path={synthetic_run['ckpt']}",
            f"input={images}",
            f"output={tmp_path / 'out'}",
            "save_probabilities=true",
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    written = sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz"))
    assert written == sorted(p.name for p in images.glob("*.nii.gz"))
    probabilities = nib.load(tmp_path / "out" / "probabilities" / written[0])
    assert probabilities.shape == (*nib.load(images / written[0]).shape, 3)
    assert np.allclose(np.asarray(probabilities.dataobj).sum(-1), 1.0, atol=1e-4)


def test_inputs_the_model_cannot_take_are_named(synthetic_run, tmp_path):
    predictor = Predictor(synthetic_run["ckpt"])
    two_channels = tmp_path / "two_channels.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20, 2), np.float32), np.eye(4)), two_channels)
    with pytest.raises(ValueError, match=r"two_channels.nii.gz: 2 channel\(s\), the model was trained on 1"):
        predictor.predict(two_channels)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.nii.gz: cannot be read"):
        predictor.predict(broken)


def test_scores_match_hand_computation():
    spacing = (1.0, 1.0, 2.0)
    ref, pred = np.zeros((4, 4, 8), np.int64), np.zeros((4, 4, 8), np.int64)
    ref[0, 0, 0:2] = 1  # label 1: reference 2 voxels along z, prediction the first of them
    pred[0, 0, 0] = 1
    ref[3, 3, 1] = 2  # label 2: one voxel each, 3 slices apart along z (2 mm slices)
    pred[3, 3, 4] = 2
    scores = score_case(pred, ref, spacing, ["background", "one", "two", "three"])
    assert scores["dice_one"] == pytest.approx(2 * 1 / (2 + 1))
    # distances prediction->reference {0}, reference->prediction {0, 2 mm}: 95th percentile 1.9 mm
    assert scores["hd95_one"] == pytest.approx(np.percentile([0.0, 2.0], 95))
    assert scores["dice_two"] == 0.0 and scores["hd95_two"] == pytest.approx(3 * 2.0)
    # label 3 absent from both: no score, left out of the means (as val/dice and nnU-Net do)
    assert math.isnan(scores["dice_three"]) and math.isnan(scores["hd95_three"])
    assert scores["ref_ml_one"] == pytest.approx(2 * 2.0 / 1000) and scores["pred_ml_two"] == pytest.approx(
        0.002
    )


def test_a_missed_structure_scores_zero_and_the_worst_distance():
    ref, pred = np.zeros((4, 4, 4), np.int64), np.zeros((4, 4, 4), np.int64)
    ref[1, 1, 1] = 1
    scores = score_case(pred, ref, (1.0, 2.0, 2.0), ["background", "one"])
    assert scores["dice_one"] == 0.0
    assert scores["hd95_one"] == pytest.approx(math.sqrt(4**2 + 8**2 + 8**2))  # the image diagonal


@needs_shared_data
def test_spleen_prediction_returns_the_original_5mm_grid(tmp_path):
    cfg = compose_config(
        tmp_path,
        [
            "task=spleen",
            "task.msd_folder=Task09_Spleen_crop",
            "hardware=cpu",
            "model.width=8",
            "task.patch_size=[64,64,64]",
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=1",
            "task.val_every_n_epochs=1",
            "trainer.enable_progress_bar=false",
        ],
        data_dir=SHARED_DATA,
    )
    train(cfg)
    ckpt = next((tmp_path / "run" / "checkpoints").glob("best-*.ckpt"))
    source = SHARED_DATA / "Task09_Spleen_crop" / "imagesTr" / "spleen_2.nii.gz"
    [written] = predict_files(Predictor(ckpt), [source], tmp_path / "out")
    assert nib.load(written).shape == (164, 166, 26)
    assert np.array_equal(nib.load(written).affine, nib.load(source).affine)


def test_the_best_checkpoint_holds_the_averaged_weights_validation_scored(synthetic_run, tmp_path):
    """Validation runs on the EMA of the weights; the checkpoint stores that average for predict and
    the raw weights for resuming. Evaluated on the validation cases, it scores its own val/dice."""
    checkpoint = torch.load(synthetic_run["ckpt"], map_location="cpu", weights_only=True)
    averaged, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert averaged.keys() == raw.keys()
    assert any(not torch.equal(averaged[k], raw[k]) for k in averaged if averaged[k].is_floating_point())
    out = tmp_path / "eval"
    evaluate_split(synthetic_run, "val", out)
    summary = json.loads((out / "summary.json").read_text())
    best = synthetic_run["metrics"]["best/val_dice"]
    assert summary["foreground_mean_dice"] == pytest.approx(best, abs=0.01)


def test_evaluate_on_the_validation_cases_reports_the_runs_val_dice(tmp_path):
    """One inference path: `validate`'s val/dice of a checkpoint is `evaluate`'s foreground mean Dice on the
    same cases. Volumes of 64 x 64 x 48 under 32^3 patches: overlaps 0.25 and 0.5 place the windows apart
    (with evaluate at 0.5 and validation at 0.25 this test read 0.0445 against 0.0430)."""
    shape = ["task.synthetic.shape=[64,64,48]", "task.synthetic.num_cases=8", "trainer.max_epochs=3"]
    train(compose_config(tmp_path, [*tiny_synthetic_overrides(), *shape]))
    ckpt = next((tmp_path / "run" / "checkpoints").glob("best-*.ckpt"))
    validated = validate_with(tmp_path, "validate", ckpt, "cpu")
    run = {"ckpt": ckpt, "data": tmp_path / "data" / "Task00_Synthetic"}
    evaluate_split(run, "val", tmp_path / "evaluate")
    evaluated = json.loads((tmp_path / "evaluate" / "summary.json").read_text())
    assert evaluated["cases"] == validated["cases"] == 2
    assert evaluated["foreground_mean_dice"] == pytest.approx(validated["val/dice"], abs=1e-3)


def test_a_checkpoint_without_a_usable_overlap_is_named_unless_one_is_given(tmp_path):
    checkpoint = torch.load(ROOT / "tests" / "fixtures" / "synthetic_width4_v1.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["run_config"]["module"]["sw_overlap"] = "half"
    torch.save(checkpoint, ckpt := tmp_path / "odd.ckpt")
    with pytest.raises(InputError, match=r"odd\.ckpt: its module\.sw_overlap is 'half'; give overlap="):
        Predictor(ckpt)
    assert Predictor(ckpt, overlap=0.5).window["overlap"] == 0.5
