"""Checkpoints outlive the code: a checkpoint from an earlier lightning_seg still predicts and resumes,
one from a newer lightning_seg is refused by name.

tests/fixtures/synthetic_width4_v1.ckpt was written by the training code of format 1 (a 1-epoch run on
the tiny synthetic task, `model.width=4`); regenerate it only when FORMAT_VERSION changes, and keep
the old one as `..._v<old>.ckpt` with its test, so every older format stays covered:
`python -m tests.test_checkpoint_format tests/fixtures/synthetic_width<...>_v<N>.ckpt`.
"""

import shutil
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lightning_seg import checkpoint_format
from lightning_seg.checkpoint_format import (
    FORMAT_KEY,
    FORMAT_VERSION,
    MIGRATIONS,
    CheckpointFormatError,
    load_checkpoint,
    upgrade,
)
from lightning_seg.data.synthetic import synthetic_case
from lightning_seg.errors import UserError
from lightning_seg.inference import Predictor
from lightning_seg.training import train

from .conftest import compose_config, tiny_synthetic_overrides

FIXTURE = Path(__file__).parent / "fixtures" / "synthetic_width4_v1.ckpt"


def fixture_overrides() -> list[str]:
    """The run that wrote the fixture (tiny synthetic task, model.width=4), on a CPU."""
    return [*tiny_synthetic_overrides(), "trainer.max_epochs=1"]


def write_fixture(target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="lightning_seg_fixture_") as tmp:
        train(compose_config(Path(tmp), fixture_overrides()))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(tmp) / "run" / "checkpoints" / "last.ckpt", target)


def saved_copy(tmp_path: Path, name: str, edit) -> Path:
    checkpoint = torch.load(FIXTURE, map_location="cpu", weights_only=True)
    edit(checkpoint)
    path = tmp_path / name
    torch.save(checkpoint, path)
    return path


def predict_a_synthetic_case(ckpt: Path, tmp_path: Path) -> tuple[np.ndarray, np.ndarray]:
    image, _ = synthetic_case((36, 30, 20), 3, np.random.default_rng(3))
    source = tmp_path / "case.nii.gz"
    nib.save(nib.Nifti1Image(image, np.diag([1.5, 1.5, 2.0, 1.0])), source)
    labels, probabilities = Predictor(ckpt).predict(source)
    return image, labels.numpy()


def test_the_format_1_fixture_is_small_plain_data_and_still_predicts(tmp_path):
    assert FIXTURE.stat().st_size < 1_300_000  # weights 0.36 MB, Adam moments 0.72 MB
    checkpoint = torch.load(FIXTURE, map_location="cpu", weights_only=True)
    assert checkpoint[FORMAT_KEY] == 1
    image, labels = predict_a_synthetic_case(FIXTURE, tmp_path)
    assert labels.shape == image.shape
    assert set(np.unique(labels)) <= {0, 1, 2}


def test_a_version_0_checkpoint_is_migrated_for_predict_and_resume(tmp_path):
    v0 = saved_copy(tmp_path, "v0.ckpt", lambda c: c.pop(FORMAT_KEY))
    assert FORMAT_KEY not in torch.load(v0, map_location="cpu", weights_only=True)
    assert load_checkpoint(v0)[0][FORMAT_KEY] == FORMAT_VERSION
    image, labels = predict_a_synthetic_case(v0, tmp_path)
    assert labels.shape == image.shape
    # today's training resumes it; the checkpoints it writes carry today's format
    cfg = compose_config(tmp_path, [*tiny_synthetic_overrides(), "trainer.max_epochs=2", f"ckpt_path={v0}"])
    with pytest.warns(match="not created with WeightAveraging"):  # the average starts from its weights
        _, objects = train(cfg)
    assert objects["trainer"].current_epoch == 2
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last[FORMAT_KEY] == FORMAT_VERSION and last["global_step"] > 0


def test_a_checkpoint_from_a_newer_version_is_refused_by_name(tmp_path):
    newer = saved_copy(tmp_path, "from_the_future.ckpt", lambda c: c.update({FORMAT_KEY: 99}))
    message = (
        rf"{newer}: written by a newer lightning_seg \(format 99\); this one reads up to {FORMAT_VERSION}: "
        "upgrade lightning_seg"
    )
    with pytest.raises(CheckpointFormatError, match=message) as error:
        Predictor(newer)
    assert isinstance(error.value, UserError)
    cfg = compose_config(
        tmp_path, [*tiny_synthetic_overrides(), "trainer.max_epochs=2", f"ckpt_path={newer}"]
    )
    with pytest.raises(CheckpointFormatError, match=message):
        train(cfg)
    assert not list((tmp_path / "run" / "checkpoints").glob("*.ckpt"))


@pytest.mark.parametrize("version", ["1", -1, True, 1.0])
def test_a_format_that_is_not_a_version_number_is_named(version):
    with pytest.raises(CheckpointFormatError, match=rf"odd.ckpt: {FORMAT_KEY}=.* is not a format version"):
        upgrade({FORMAT_KEY: version}, "odd.ckpt")


def test_every_version_has_a_migration_and_they_run_in_order(monkeypatch):
    assert set(MIGRATIONS) == set(range(FORMAT_VERSION))
    state = {"net.w": torch.ones(2)}
    v0 = {"state_dict": dict(state)}
    assert upgrade(v0) == {"state_dict": state, FORMAT_KEY: FORMAT_VERSION}  # 0 -> 1 changes nothing else

    # the next format change, e.g. a renamed network attribute: one registered step more
    def rename_net(checkpoint: dict) -> None:
        sd = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k.replace("net.", "network.", 1): v for k, v in sd.items()}

    monkeypatch.setattr(checkpoint_format, "FORMAT_VERSION", 2)
    monkeypatch.setitem(MIGRATIONS, 1, rename_net)
    migrated = upgrade({"state_dict": dict(state)})
    assert migrated[FORMAT_KEY] == 2 and list(migrated["state_dict"]) == ["network.w"]
    assert upgrade({"state_dict": {"network.w": 1}, FORMAT_KEY: 2})["state_dict"] == {"network.w": 1}


if __name__ == "__main__":
    write_fixture(Path(sys.argv[1]) if len(sys.argv) > 1 else FIXTURE)
