"""Per-phase timing of real training steps: forward, loss, backward, optimizer."""

import time
from itertools import pairwise

import torch
from pytorch_lightning import Callback, Trainer

from lightning_seg.model.module import SegmentationModule  # declares what callbacks read
from lightning_seg.study.callbacks.peak_memory import peak_memory_gib

# in the order a step runs them (the reference talk's table shows forward, backward, loss, optimizer)
PHASES = ("forward", "loss", "backward", "optimizer")
MARKS = ("start", *PHASES)


class PhaseClock:
    """CUDA events on a GPU (read after one synchronisation at the end of the step, so the step runs
    as it would unmeasured), the host clock on a CPU."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: dict[str, object] = {}

    def mark(self, name: str) -> None:
        if name not in self.marks:
            self.marks[name] = torch.cuda.Event(enable_timing=True) if self.cuda else time.perf_counter()
            if self.cuda:
                self.marks[name].record()

    def durations(self) -> dict[str, float] | None:
        """Seconds per phase and `total`, or None when the step did not pass every mark in order."""
        if list(self.marks) != list(MARKS):  # e.g. a step the optimizer skipped
            return None
        if self.cuda:
            torch.cuda.synchronize()
            seconds = [a.elapsed_time(b) / 1000 for a, b in pairwise(self.marks.values())]
        else:
            seconds = [b - a for a, b in pairwise(self.marks.values())]
        return {**dict(zip(PHASES, seconds, strict=True)), "total": sum(seconds)}


class StepBreakdown(Callback):
    """Every `every_n_steps` training steps (0: never), times one step phase by phase and logs
    `step/<phase>_s`, `step/total_s` and `step/peak_memory_gib`; other steps pay one integer comparison.
    Phases split where Lightning's hooks and the network's forward hook fire: the step runs as in training
    (precision plugin, grad scaler, optimizer). `keep=True` keeps each in `history` (the step benchmark's)."""

    def __init__(self, every_n_steps: int = 50, keep: bool = False) -> None:
        self.every_n_steps = every_n_steps
        self.keep = keep
        self.history: list[dict[str, float]] = []
        self._clock: PhaseClock | None = None
        self._hook = None
        self._measured_step = 0

    def setup(self, trainer: Trainer, pl_module: SegmentationModule, stage: str) -> None:
        if self.every_n_steps > 0 and self._hook is None:
            # a host clock cannot be traced: kept out of torch.compile (a graph break after the last op)
            self._hook = pl_module.net.register_forward_hook(
                torch.compiler.disable(lambda *_: self._mark("forward"))
            )

    def teardown(self, trainer: Trainer, pl_module: SegmentationModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _mark(self, name: str) -> None:
        if self._clock is not None:
            self._clock.mark(name)

    def on_train_batch_start(self, trainer: Trainer, pl_module: SegmentationModule, batch, batch_idx) -> None:
        if self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self._clock = PhaseClock(pl_module.device.type == "cuda")
            self._measured_step = trainer.global_step
            self._mark("start")

    def on_before_backward(self, trainer: Trainer, pl_module: SegmentationModule, loss) -> None:
        self._mark("loss")

    def on_after_backward(self, trainer: Trainer, pl_module: SegmentationModule) -> None:
        self._mark("backward")

    def on_train_batch_end(self, trainer: Trainer, pl_module: SegmentationModule, outputs, batch, batch_idx):
        if self._clock is None:
            return
        self._mark("optimizer")
        seconds, self._clock = self._clock.durations(), None
        if seconds is None:
            return
        if self.keep:
            self.history.append(seconds)
        metrics = {f"step/{phase}_s": value for phase, value in seconds.items()}
        metrics["step/peak_memory_gib"] = peak_memory_gib(pl_module.device)
        # straight to the loggers: self.log would drop steps that fall between log_every_n_steps
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=self._measured_step)
