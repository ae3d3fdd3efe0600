"""Time the training step `train.py` runs, phase by phase, at one grid point.

The step runs inside a real Lightning Trainer: the same module, precision plugin (autocast and
grad scaling as Lightning does them), optimizer config and fast-path switches (`speed.*`,
`trainer.benchmark` and `trainer.deterministic`, both set by `reproducible`) as training; phases come from
the same StepBreakdown callback training logs with.
Input is either synthetic (tensors already on the device: the step alone) or the real training
loader (the step as a run sees it, loader waits included).
"""

import itertools
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
    """Batch start times, data wait and losses; resets the CUDA peak once warm-up is over."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.starts: list[float] = []
        self.losses: list[float] = []
        self.wait_at_warmup = 0.0
        self.warmup_peak_bytes = 0  # CUDA: the peak of the warm-up steps (cuDNN benchmark's trials included)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        cuda = pl_module.device.type == "cuda"
        if cuda and not self.starts:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        if len(self.starts) == self.warmup:
            if cuda:
                torch.cuda.synchronize()
                self.warmup_peak_bytes = torch.cuda.max_memory_allocated(pl_module.device)
                torch.cuda.reset_peak_memory_stats(pl_module.device)
            self.wait_at_warmup = trainer.profiler.data_wait_s
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def train_step_flops(module, batch: dict) -> int:
    """FLOPs of one forward and backward, counted eagerly on a copy of the module: a counted
    backward on the timed module itself was seen to leave it producing NaN under CPU bf16."""
    copy = deepcopy(module)
    with FlopCounterMode(display=False) as counter:
        copy.step_loss(batch).backward()
    return counter.get_total_flops()


def measure(cfg: DictConfig, batch_size: int, device: torch.device, loader: Iterable | None = None) -> dict:
    """Warm-up, then `cfg.bench.steps` timed training steps; synthetic input unless `loader` is given."""
    bench = cfg.bench
    if bench.steps < 2:
        raise ValueError("bench.steps must be at least 2 (step rates come from consecutive batch starts)")
    seed_everything(cfg.seed, workers=True)
    set_tf32(uses_tf32(cfg.precision))
    module = instantiate(cfg.module)
    inputs = synthetic_inputs(cfg, batch_size, device, bench.input_sets)
    flops = train_step_flops(module.to(device), inputs[0])
    steps = bench.warmup + bench.steps
    breakdown, recorder = StepBreakdown(every_n_steps=1, keep=True), StepRecorder(bench.warmup)
    average = cfg.callbacks.get("weight_average")  # training updates its weight average after every step
    callbacks = [breakdown, recorder, *([instantiate(average)] if average else [])]
    with tempfile.TemporaryDirectory(prefix="bench-") as root:
        trainer = step_trainer(cfg, steps, callbacks, root, profiler=DataWaitProfiler())
        fit_steps(trainer, module, loader or SyntheticBatches(inputs, steps))
    loss = recorder.losses[-1]
    if not torch.isfinite(torch.tensor(loss)):
        raise FloatingPointError(f"non-finite loss {loss}")
    timed = breakdown.history[bench.warmup :]
    starts = recorder.starts[bench.warmup :]
    intervals = [b - a for a, b in itertools.pairwise(starts)]
    interval = statistics.median(intervals)
    total = statistics.median(step["total"] for step in timed)
    voxels = batch_size * torch.tensor(list(cfg.task.patch_size)).prod().item()
    return {
        "median_s": {k: statistics.median(step[k] for step in timed) for k in timed[0]},
        "iqr_s": {k: _iqr([step[k] for step in timed]) for k in timed[0]},
        "step_interval_s": interval,  # batch start to batch start: loader, step and Lightning together
        "data_wait_frac": (trainer.profiler.data_wait_s - recorder.wait_at_warmup)
        / (recorder.starts[-1] - recorder.starts[bench.warmup]),
        "peak_memory_gib": peak_memory_gib(device),
        # CUDA: the warm-up included, as the memory planner's reference peaks were measured
        "peak_with_warmup_gib": max(peak_memory_gib(device), recorder.warmup_peak_bytes / 2**30),
        "samples_per_s": batch_size / interval,
        "voxels_per_s": voxels / total,
        "train_step_gflop": flops / 1e9,
        "tflop_per_s": flops / total / 1e12,
        "loss": loss,
        "fast_path": module.fast_path,
    }


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]
