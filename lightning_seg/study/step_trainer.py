"""The Trainer that times N training steps on synthetic batches: what `precision=auto` and the benchmark
time. The module's own training step under the run's precision plugin, optimizer and `trainer.*`
switches, on one device, without the loggers, checkpoints and validation a timing must not include."""

import warnings
from collections.abc import Iterable, Iterator

import torch
from omegaconf import DictConfig
from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.profilers import Profiler

from lightning_seg.trainers import LIGHTNING_OWN_DEPRECATION, build_trainer


class SyntheticBatches(Iterable):
    """`length` training batches drawn in turn from a few random input sets on the device."""

    def __init__(self, inputs: list[dict[str, torch.Tensor]], length: int) -> None:
        self.inputs, self.length = inputs, length

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return (self.inputs[i % len(self.inputs)] for i in range(self.length))

    def __len__(self) -> int:
        return self.length


def synthetic_inputs(cfg: DictConfig, batch_size: int, device: torch.device, sets: int) -> list[dict]:
    """`sets` random batches of the task's patch: images and labels of its label count."""
    patch, labels = list(cfg.task.patch_size), len(cfg.task.labels)
    return [
        {
            "image": torch.randn(batch_size, cfg.task.in_channels, *patch, device=device),
            "label": torch.randint(0, labels, (batch_size, 1, *patch), device=device).float(),
        }
        for _ in range(sets)
    ]


def synthetic_batches(cfg: DictConfig, batch_size: int, device: torch.device, steps: int, sets: int = 2):
    return SyntheticBatches(synthetic_inputs(cfg, batch_size, device, sets), steps)


def fit_steps(trainer: Trainer, module: LightningModule, batches: Iterable[dict]) -> None:
    """`trainer.fit` of a `step_trainer`, without Lightning's warnings of no validation loop and its own
    deprecation (neither is a finding here)."""
    no_validation = "You defined a `validation_step` but have no `val_dataloader`"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f"{LIGHTNING_OWN_DEPRECATION}|{no_validation}")
        trainer.fit(module, train_dataloaders=batches)


def step_trainer(
    cfg: DictConfig, steps: int, callbacks: list[Callback], root: str, profiler: Profiler | None = None
) -> Trainer:
    """The run's Trainer (precision, cuDNN, determinism) for `steps` steps on one device, in `root`."""
    return build_trainer(
        cfg,
        devices=1,
        strategy="auto",
        num_nodes=1,
        max_steps=steps,
        max_epochs=-1,
        max_time=None,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        profiler=profiler,
        default_root_dir=root,
    )
