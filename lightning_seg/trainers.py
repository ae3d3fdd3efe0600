"""The one Trainer factory: training, validation and the study's benchmark and probes build theirs here."""

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning import Trainer

# Lightning 2.6's own _pytree uses torch's deprecated LeafSpec: nothing a user can act on
LIGHTNING_OWN_DEPRECATION = r"`isinstance\(treespec, LeafSpec\)` is deprecated"


def build_trainer(cfg: DictConfig, **overrides: Any) -> Trainer:
    """`cfg.trainer` with `overrides` (callbacks, logger, limits): `trainer.*` means the same everywhere."""
    return instantiate(cfg.trainer, **overrides)
