"""An EMA of the weights for validation, checkpoints and the final model: it removes the step-to-step noise
of validation Dice under a constant learning rate (docs/results/hippocampus_ablation_cpu/). Lightning's
WeightAveraging does it (checkpoints: average as `state_dict`, raw weights as `current_model_state`); its
EMAWeightAveraging's fixed decay keeps the random initial weights for hundreds of steps: ours warms up."""

import warnings

import torch
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn

from lightning_seg.errors import ConfigError


class WarmupEMA:
    """AveragedModel's `multi_avg_fn`: EMA with the decay min(decay, (1 + n) / (10 + n)) after n updates
    (TensorFlow's ExponentialMovingAverage `num_updates` rule): the average covers the last ~10% of a short
    run, 1 / (1 - decay) steps of a long one. A class, not a closure: spawned DDP processes unpickle it."""

    def __init__(self, decay: float) -> None:
        self.decay = decay

    def current_decay(self, num_averaged: float) -> float:
        return min(self.decay, (1.0 + num_averaged) / (10.0 + num_averaged))

    @torch.no_grad()
    def __call__(self, averaged: list, current: list, num_averaged: torch.Tensor) -> None:
        # reading the count synchronises a GPU, as AveragedModel itself already does on every update
        get_ema_multi_avg_fn(self.current_decay(float(num_averaged)))(averaged, current, num_averaged)


class WeightAverage(WeightAveraging):
    """Lightning's weight averaging with the warm-up EMA above, updated after every optimizer step."""

    def __init__(self, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ConfigError(f"callbacks.weight_average.decay must be in [0, 1), got {decay}")
        super().__init__(multi_avg_fn=WarmupEMA(decay))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        with warnings.catch_warnings():
            # Lightning warns for any configure_model that might shard the layers; ours only sets the
            # memory layout and compiles in place (idempotent), so the copy it averages is whole
            warnings.filterwarnings("ignore", message=".*WeightAveraging doesn't support sharding")
            super().setup(trainer, pl_module, stage)
