"""Peak memory of training and of validation, logged with every validation."""

import logging
import resource
import sys
from pathlib import Path

import torch
from pytorch_lightning import Callback, LightningModule, Trainer

log = logging.getLogger(__name__)


def peak_memory_gib(device: torch.device | str) -> float:
    """Peak memory of this process: GPU memory allocated by PyTorch, else the CPU resident set."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resident_peak_bytes() / 2**30


def resident_peak_bytes() -> int:
    """This process's peak resident set. On Linux from /proc (VmHWM), not ru_maxrss: that one keeps, across
    exec, the peak of the process this one was spawned from (a DDP rank launched by rank 0 read rank 0's)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak if sys.platform == "darwin" else peak * 1024


# under DDP: the fullest process's peak, the one that runs out of memory first
MAX_OVER_PROCESSES = {"sync_dist": True, "reduce_fx": "max"}


class PeakMemory(Callback):
    """On a GPU: `memory/train_peak_gib` (the training steps since the previous validation) and
    `memory/val_peak_gib` (whole-volume validation), the CUDA peak counter being reset at each boundary.
    On a CPU, whose resident-set peak cannot be reset, only `memory/peak_gib` (the process peak so far)."""

    def __init__(self) -> None:
        self._train_peak: float | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        else:
            log.info(
                "memory/peak_gib is this process's peak resident memory (CPU: training, validation "
                "and the data cache together; it cannot be reset between them)"
            )

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda" and not trainer.sanity_checking:
            self._train_peak = peak_memory_gib(pl_module.device)
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        cuda = pl_module.device.type == "cuda"
        name = "memory/val_peak_gib" if cuda else "memory/peak_gib"
        pl_module.log(name, peak_memory_gib(pl_module.device), **MAX_OVER_PROCESSES)
        if cuda and self._train_peak is not None:
            pl_module.log("memory/train_peak_gib", self._train_peak, **MAX_OVER_PROCESSES)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda" and not trainer.sanity_checking:
            torch.cuda.reset_peak_memory_stats(pl_module.device)
