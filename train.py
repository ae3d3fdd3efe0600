"""Train a 3D U-Net on an MSD task: `python train.py task=left_atrium precision=16`."""

import hydra
from omegaconf import DictConfig

import lightning_seg  # noqa: F401  (registers the config resolvers)
from lightning_seg.entry import user_errors
from lightning_seg.training import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with user_errors(cfg):  # a broken dataset, config or path: one `error:` line, exit code 2
        metrics, _ = train(cfg)
    return metrics.get("best/val_dice")  # what a Hydra sweeper optimizes


if __name__ == "__main__":
    main()
