"""Is the step starved? Data wait, samples per second and compile time, logged with every validation."""

import logging
import time
from itertools import pairwise

from pytorch_lightning import Callback, Trainer

from lightning_seg.model.module import SegmentationModule  # declares what callbacks read
from lightning_seg.study.callbacks.training_clock import TrainingClock
from lightning_seg.study.profiler import DataWaitProfiler

log = logging.getLogger(__name__)


class Throughput(Callback):
    """Logs `time/data_wait_s` (seconds the training loop waited inside the loader's `next()`),
    `perf/data_wait_frac` (that wait over training time, validation excluded), `perf/samples_per_s`
    (patches per second of training time) and, for a compiled network, `time/compile_s` (how much longer
    the first step took than the second). Needs TrainingClock and the profiler set to DataWaitProfiler."""

    def __init__(self) -> None:
        self.samples = 0
        self._wait_before_resume = 0.0  # the profiler counts from zero in every process
        self._step_starts: list[float] = []
        self.trainer: Trainer | None = None

    def setup(self, trainer: Trainer, pl_module: SegmentationModule, stage: str) -> None:
        self.trainer = trainer
        if not isinstance(trainer.profiler, DataWaitProfiler):
            log.warning(
                "trainer.profiler is %s, not DataWaitProfiler: time/data_wait_s is not logged",
                type(trainer.profiler).__name__,
            )

    def on_train_batch_start(self, trainer: Trainer, pl_module: SegmentationModule, batch, batch_idx) -> None:
        if len(self._step_starts) == 3:
            return
        self._step_starts.append(time.perf_counter())
        if len(self._step_starts) == 3 and pl_module.fast_path["compiled"]:
            first, second = (b - a for a, b in pairwise(self._step_starts))
            pl_module.fast_path["compile_s"] = max(0.0, first - second)
            log.info("torch.compile: the first step took %.1f s longer than the second", first - second)

    def on_train_batch_end(self, trainer: Trainer, pl_module: SegmentationModule, outputs, batch, batch_idx):
        self.samples += len(batch["image"]) * trainer.world_size

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: SegmentationModule) -> None:
        clock = next((c for c in trainer.callbacks if isinstance(c, TrainingClock)), None)
        if trainer.sanity_checking or clock is None or clock.train_seconds() <= 0:
            return
        train_s = clock.train_seconds()
        # under DDP: samples of all processes; times averaged over the processes
        pl_module.log("perf/samples_per_s", self.samples / train_s, sync_dist=True)
        if "compile_s" in pl_module.fast_path:
            pl_module.log("time/compile_s", pl_module.fast_path["compile_s"], sync_dist=True)
        if isinstance(trainer.profiler, DataWaitProfiler):
            wait = self._data_wait_s(trainer)
            pl_module.log("time/data_wait_s", wait, sync_dist=True)
            pl_module.log("perf/data_wait_frac", wait / train_s, sync_dist=True)

    def _data_wait_s(self, trainer: Trainer) -> float:
        profiler = trainer.profiler if isinstance(trainer.profiler, DataWaitProfiler) else None
        return self._wait_before_resume + (profiler.data_wait_s if profiler else 0.0)

    def state_dict(self) -> dict:
        return {"samples": self.samples, "data_wait_s": self._data_wait_s(self.trainer)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.samples = state_dict["samples"]
        self._wait_before_resume = state_dict.get("data_wait_s", 0.0)
