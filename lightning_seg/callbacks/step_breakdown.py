"""Per-phase timing of real training steps: forward, loss, backward, optimizer."""

import time

import torch
from pytorch_lightning import Callback, LightningModule, Trainer

from lightning_seg.memory import peak_memory_gib

PHASES = ("forward", "loss", "backward", "optimizer")


class StepBreakdown(Callback):
    """Every `every_n_steps` training steps, time one step phase by phase and log
    `step/<phase>_s`, `step/total_s` and `step/peak_memory_gib`.

    Phases are split where Lightning's hooks and the network's forward hook fire, with a
    CUDA synchronisation at each boundary (as the reference talk measured), and only on the
    measured steps: other steps pay one integer comparison. `every_n_steps=0` turns it off.
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = every_n_steps
        self._marks: dict[str, float] | None = None
        self._hook = None
        self._cuda = False
        self._measured_step = 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.every_n_steps > 0 and self._hook is None:
            self._hook = pl_module.net.register_forward_hook(lambda *_: self._mark("forward"))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _mark(self, name: str) -> None:
        if self._marks is not None and name not in self._marks:
            if self._cuda:
                torch.cuda.synchronize()
            self._marks[name] = time.perf_counter()

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int
    ) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self._cuda = pl_module.device.type == "cuda"
            self._marks = {}
            self._measured_step = trainer.global_step
            self._mark("start")

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss) -> None:
        self._mark("loss")

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._mark("backward")

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx
    ) -> None:
        if self._marks is None:
            return
        self._mark("optimizer")
        marks, self._marks = self._marks, None
        if list(marks) != ["start", *PHASES]:  # e.g. a skipped step: nothing sound to log
            return
        bounds = [marks[k] for k in ("start", *PHASES)]
        metrics = {
            f"step/{phase}_s": end - begin
            for phase, begin, end in zip(PHASES, bounds, bounds[1:], strict=False)
        }
        metrics["step/total_s"] = bounds[-1] - bounds[0]
        metrics["step/peak_memory_gib"] = peak_memory_gib(pl_module.device)
        # straight to the loggers: self.log would drop steps that fall between log_every_n_steps
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=self._measured_step)
