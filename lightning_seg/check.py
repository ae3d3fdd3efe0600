"""`python -m lightning_seg.check task=NAME paths.data_dir=DIR` (console: lightning-seg-check).

The checks training runs before its first step (`MSDDataModule.prepare_data`), alone: dataset.json,
the files it lists, NIfTI readability, shapes, affines, channels, label values. Prints `OK` with the
number of cases, exit code 0; or every problem found, each naming its file, exit code 2.
"""

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_seg.config import CONFIG_DIR
from lightning_seg.data.layout import read_datalist
from lightning_seg.entry import user_errors
from lightning_seg.task import check_task


def check(cfg: DictConfig) -> int:
    """Check the configured task folder (writing or downloading it first, as training would);
    return its number of cases or raise DatasetError / ConfigError."""
    check_task(cfg)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    return len(read_datalist(datamodule.task_dir))


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="check")
def main(cfg: DictConfig) -> None:
    with user_errors(cfg):
        count = check(cfg)
    labels = len(cfg.task.labels)
    print(
        f"OK: {count} cases in {cfg.data.task_dir} pass the checks (files listed in dataset.json, "
        f"readable NIfTI, {cfg.task.in_channels} channel(s), matching shapes and affines, "
        f"finite intensities, labels 0..{labels - 1})"
    )


if __name__ == "__main__":
    main()
