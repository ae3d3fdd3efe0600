"""The training step `train.py` runs, timed phase by phase at one grid point in a real Trainer: training's
module, precision plugin, optimizer and switches, on synthetic batches or the real loader (waits included)."""

import itertools
import math
import statistics
import tempfile
import time
from collections.abc import Iterable
from copy import deepcopy

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from pytorch_lightning import Callback, seed_everything
from torch.utils.flop_counter import FlopCounterMode

from lightning_seg.precision import set_tf32, uses_tf32
from lightning_seg.study.callbacks.peak_memory import peak_memory_gib
from lightning_seg.study.callbacks.step_breakdown import StepBreakdown
from lightning_seg.study.profiler import DataWaitProfiler
from lightning_seg.study.step_trainer import SyntheticBatches, fit_steps, step_trainer, synthetic_inputs


class StepRecorder(Callback):
    """Batch start times, data wait and the last loss; resets the CUDA peak once warm-up is over."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.starts, self.loss, self.wait_at_warmup = [], math.nan, 0.0
        self.warmup_peak_bytes = 0  # CUDA: the peak of the warm-up steps (cuDNN benchmark's trials included)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        started = len(self.starts)
        if pl_module.device.type == "cuda" and started in (0, self.warmup):
            torch.cuda.synchronize()
            if started:  # warm-up over (without one, 0 leaves peak_with_warmup_gib the timed peak)
                self.warmup_peak_bytes = torch.cuda.max_memory_allocated(pl_module.device)
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        if started == self.warmup:
            self.wait_at_warmup = trainer.profiler.data_wait_s
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.loss = float(outputs["loss"])


def measure(cfg: DictConfig, batch_size: int, device: torch.device, loader: Iterable | None = None) -> dict:
    """Warm-up, then `cfg.bench.steps` timed training steps; synthetic input unless `loader` is given."""
    if cfg.bench.steps < 2:
        raise ValueError("bench.steps must be at least 2 (step rates come from consecutive batch starts)")
    seed_everything(cfg.seed, workers=True)
    set_tf32(uses_tf32(cfg.precision))
    module = instantiate(cfg.module)
    inputs = synthetic_inputs(cfg, batch_size, device, cfg.bench.input_sets)
    # FLOPs counted on a copy: a counted backward on the timed module was seen to leave it NaN under CPU bf16
    with FlopCounterMode(display=False) as counter:
        deepcopy(module.to(device)).step_loss(inputs[0]).backward()
    flops = counter.get_total_flops()
    steps = cfg.bench.warmup + cfg.bench.steps
    breakdown, recorder = StepBreakdown(every_n_steps=1, keep=True), StepRecorder(cfg.bench.warmup)
    average = cfg.callbacks.get("weight_average")  # training updates its weight average after every step
    callbacks = [breakdown, recorder, *([instantiate(average)] if average else [])]
    with tempfile.TemporaryDirectory(prefix="bench-") as root:
        trainer = step_trainer(cfg, steps, callbacks, root, profiler=DataWaitProfiler())
        fit_steps(trainer, module, loader or SyntheticBatches(inputs, steps))
    if not math.isfinite(recorder.loss):
        raise FloatingPointError(f"non-finite loss {recorder.loss}")
    timed = breakdown.history[cfg.bench.warmup :]
    interval = statistics.median(b - a for a, b in itertools.pairwise(recorder.starts[cfg.bench.warmup :]))
    median = {k: statistics.median(step[k] for step in timed) for k in timed[0]}
    return {
        "median_s": median,
        "iqr_s": {k: _iqr([step[k] for step in timed]) for k in timed[0]},
        "step_interval_s": interval,  # batch start to batch start: loader, step and Lightning together
        "data_wait_frac": (trainer.profiler.data_wait_s - recorder.wait_at_warmup)
        / (recorder.starts[-1] - recorder.starts[cfg.bench.warmup]),
        "peak_memory_gib": peak_memory_gib(device),
        # CUDA: the warm-up included, as the memory planner's reference peaks were measured
        "peak_with_warmup_gib": max(peak_memory_gib(device), recorder.warmup_peak_bytes / 2**30),
        "samples_per_s": batch_size / interval,
        "voxels_per_s": batch_size * math.prod(cfg.task.patch_size) / median["total"],
        "train_step_gflop": flops / 1e9,
        "tflop_per_s": flops / median["total"] / 1e12,
        "loss": recorder.loss,
        "fast_path": module.fast_path,
    }


def _iqr(values: list[float]) -> float:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [0.0] * 3
    return q[2] - q[0]
