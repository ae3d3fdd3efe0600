"""Short real trainings on the MSD cases in ../shared/data (skipped where they are absent)."""

import nibabel as nib
import torch
from hydra.utils import instantiate

from lightning_seg.training import train

from .conftest import SHARED_DATA, compose_config, needs_shared_data


@needs_shared_data
def test_hippocampus_reaches_dice_070_in_a_short_training(tmp_path):
    """Three epochs of 41 steps, whatever the machine's speed (the 10-minute run passed 0.79 at step 81)."""
    cfg = compose_config(
        tmp_path,
        [
            "task=hippocampus",
            "hardware=cpu",
            "task.max_epochs=3",
            "task.val_every_n_epochs=1",
            "trainer.enable_progress_bar=false",
        ],
        data_dir=SHARED_DATA,
    )
    metrics, objects = train(cfg)
    assert len(objects["datamodule"].train_cases) + len(objects["datamodule"].val_cases) == 208
    assert objects["trainer"].global_step == 3 * 41
    assert metrics["best/val_dice"] >= 0.70, metrics


@needs_shared_data
def test_spleen_ct_case_resamples_to_the_task_spacing_and_trains_a_step(tmp_path):
    overrides = [
        "task=spleen",
        "task.msd_folder=Task09_Spleen_crop",
        "hardware=cpu",
        "model.width=8",
        "task.patch_size=[64,64,64]",
        "trainer.fast_dev_run=true",
        "trainer.enable_progress_bar=false",
    ]
    cfg = compose_config(tmp_path, overrides, data_dir=SHARED_DATA)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    volume = datamodule.val_set[0]
    header = nib.load(SHARED_DATA / "Task09_Spleen_crop" / "imagesTr" / "spleen_2.nii.gz").header
    # 164 x 166 x 26 voxels of 0.795 x 0.795 x 5 mm resampled to 1.5 x 1.5 x 2 mm: same extent, new grid
    assert list(volume["image"].shape) == [1, 87, 88, 64]
    for n_out, n_in, old, new in zip(
        volume["image"].shape[1:], header.get_data_shape(), header.get_zooms(), cfg.task.spacing, strict=True
    ):
        assert abs((n_out - 1) * new - (n_in - 1) * old) <= new
    assert 0.0 <= float(volume["image"].min()) and float(volume["image"].max()) <= 1.0  # HU window scaled
    assert set(torch.unique(volume["label"]).tolist()) == {0.0, 1.0}
    metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 1
    assert torch.isfinite(torch.tensor(metrics["train/loss_step"]))
