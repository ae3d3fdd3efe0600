"""`data.batch_size=auto`: the largest batch whose predicted training step fits this GPU's free memory.
A callback, as Lightning's own BatchSizeFinder is: its `setup` runs in every process once the device is
known and before the training loader is built, so the datamodule's batch can still change there."""

import logging

import torch
from omegaconf import OmegaConf
from pytorch_lightning import Callback, Trainer

from lightning_seg.data.datamodule import AUTO
from lightning_seg.errors import ConfigError
from lightning_seg.model.module import SegmentationModule
from lightning_seg.study.memory import largest_batch, train_step_memory

log = logging.getLogger(__name__)
GIB = 2**30


class AutoBatch(Callback):
    """With `data.batch_size=auto`: the memory planner's largest batch for global rank zero's free GPU
    memory (all processes take it), capped at what one process's training cases feed per step. The choice,
    its predicted and, at the end, its measured peak go into `fast_path["auto_batch"]` (environment.json)."""

    def setup(self, trainer: Trainer, pl_module: SegmentationModule, stage: str) -> None:
        datamodule = trainer.datamodule
        if stage != "fit" or datamodule is None or datamodule.batch_size != AUTO:
            return
        if pl_module.device.type != "cuda":
            raise ConfigError(
                "data.batch_size=auto sizes the batch to a CUDA GPU's free memory and there is no GPU here: "
                "give a number (python -m lightning_seg.study.memory plan.gpu=<card> predicts what fits)"
            )
        cfg = OmegaConf.create(pl_module.hparams["run_config"])
        cfg.data.batch_size = int(cfg.data.samples_per_volume)  # a number for the planner
        free, total = torch.cuda.mem_get_info(pl_module.device)
        batch, predicted = largest_batch(cfg, free)
        batch, predicted, free = trainer.strategy.broadcast((batch, predicted, free))
        if batch == 0:
            raise ConfigError(
                f"data.batch_size=auto: not even batch {cfg.data.samples_per_volume} fits in the "
                f"{free / GIB:.1f} GiB free on this GPU (predicted {predicted / GIB:.1f} GiB): "
                "lower task.patch_size or use precision=16"
            )
        choice = {"chosen": batch, "predicted_peak_gib": predicted / GIB, "free_gib": free / GIB}
        cases = max(1, len(datamodule.train_cases) // trainer.world_size)
        cap = cases * datamodule.samples_per_volume  # more would leave the loader without a full batch
        if batch > cap:
            log.info("data.batch_size=auto: capped at %d (%d training cases per process)", cap, cases)
            batch = choice["capped_by_cases"] = cap
            choice["predicted_peak_gib"] = train_step_memory(cfg, batch=cap).peak_bytes / GIB
        log.info(
            f"data.batch_size=auto: {batch} (predicted step peak {choice['predicted_peak_gib']:.2f} GiB of "
            f"{free / GIB:.2f} GiB free, {total / GIB:.1f} GiB card)"
        )
        datamodule.batch_size = batch
        pl_module.hparams["run_config"]["data"]["batch_size"] = batch  # checkpoints hold the number
        pl_module.fast_path["auto_batch"] = choice

    def on_fit_end(self, trainer: Trainer, pl_module: SegmentationModule) -> None:
        choice = pl_module.fast_path.get("auto_batch")
        if choice is not None:  # every GPU run with an automatic batch checks the memory planner
            measured = trainer.callback_metrics.get("memory/train_peak_gib")
            choice["measured_train_peak_gib"] = float(measured) if measured is not None else None
