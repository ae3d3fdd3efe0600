"""The task config's schema: every key a `conf/task/<name>.yaml` may set (`defaults: [_schema@task, _self_]`).

A misspelled key or a wrong type fails when Hydra composes; `check_task` names the unset required keys."""

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf

from lightning_seg.errors import ConfigError


@dataclass
class NormalizationConfig:
    # zscore_nonzero (MRI: per case and channel, on the non-zero voxels) | zscore (the same, every voxel) |
    # ct_window (an HU window to [0, 1]) | ct_zscore (nnU-Net's CT: clip, foreground z-score) | percentile
    kind: str = MISSING
    a_min: float | None = None  # ct_window, ct_zscore: the HU window (ct_window scales it to [0, 1])
    a_max: float | None = None
    mean: float | None = None  # ct_zscore: foreground mean and std over the training cases (HU)
    std: float | None = None
    lower: float | None = None  # percentile: the percentiles scaled to [0, 1]
    upper: float | None = None


@dataclass
class SyntheticConfig:
    """The phantom generator's settings (lightning_seg.data.synthetic) for a task written on first use."""

    num_cases: int = 24
    shape: list[int] = field(default_factory=lambda: [64, 64, 48])
    spacing: list[float] = field(default_factory=lambda: [1.5, 1.5, 2.0])
    seed: int = 0


@dataclass
class TaskConfig:
    name: str = MISSING
    # the task folder (MSD or nnU-Net v2 raw: dataset.json, imagesTr/, labelsTr/) under paths.data_dir,
    # or an absolute path (lightning-seg-new-task writes one)
    msd_folder: str = MISSING
    # true fetches the official MSD archive (MONAI's URL and MD5) when the folder is missing
    download: bool = False
    url: str | None = None  # null: MONAI's URL for msd_folder
    md5: str | None = None
    synthetic: SyntheticConfig | None = None  # set: the folder is a phantom written on first use
    modality: str = MISSING  # MRI | CT
    in_channels: int = 1
    labels: list[str] = MISSING  # index = label value, background first
    # scored unions of label values, {name: [values]} (BraTS); null: each label. Untyped: OmegaConf cannot
    # merge a command-line dict into a typed dict that is null
    regions: Any = None
    normalization: NormalizationConfig = field(default_factory=NormalizationConfig)
    spacing: list[float] = MISSING  # mm, target of resampling
    orientation: str = "RAS"
    crop_foreground: bool = False  # training crops to the non-zero box (a zero background around the body)
    patch_size: list[int] = MISSING
    dice_thresholds: list[float] = MISSING  # foreground mean val/dice targets for time-to-accuracy
    max_epochs: int = 1000
    val_every_n_epochs: int = 10


def check_task(cfg: DictConfig) -> None:
    """Stop with one message naming every required task key the composed config leaves unset."""
    if missing := sorted(OmegaConf.missing_keys(cfg.task)):
        keys = ", ".join(f"task.{key}" for key in missing)
        name = OmegaConf.select(cfg, "task.name", default="<name>")
        raise ConfigError(f"{keys}: not set; give it in conf/task/{name}.yaml or on the command line")
