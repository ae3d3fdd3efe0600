"""`python -m lightning_seg.check task=NAME paths.data_dir=DIR` (lightning-seg-check): training's checks
(`MSDDataModule.prepare_data`) alone: `OK` and the case count (exit 0), or every problem by file (exit 2)."""

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_seg.config import CONFIG_DIR
from lightning_seg.data.layout import read_datalist
from lightning_seg.entry import user_errors
from lightning_seg.task import check_task


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="check")
def main(cfg: DictConfig) -> None:
    with user_errors(cfg):  # a broken folder or a bad option: every problem found, exit code 2
        check_task(cfg)
        datamodule = instantiate(cfg.data)
        datamodule.prepare_data()  # writes or downloads the folder first, as training would
        count = len(read_datalist(datamodule.task_dir, datamodule.allow_outside_paths))
    print(
        f"OK: {count} cases in {cfg.data.task_dir} pass the checks (files listed in dataset.json, "
        f"readable NIfTI, {cfg.task.in_channels} channel(s), matching shapes and affines, "
        f"finite intensities, labels 0..{len(cfg.task.labels) - 1})"
    )


if __name__ == "__main__":
    main()
