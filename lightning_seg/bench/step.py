"""Time one training step of the project's module, phase by phase, at one grid point."""

import statistics
import time
from collections.abc import Callable

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.flop_counter import FlopCounterMode

from lightning_seg.memory import peak_memory_gib
from lightning_seg.precision import autocast, autocast_dtype, set_tf32, uses_tf32

PHASES = ("forward", "loss", "backward", "optimizer", "total")


class PhaseClock:
    """CUDA events on a GPU (read after one synchronisation per step), host clock on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def durations(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:], strict=False)]
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


def measure(cfg: DictConfig, batch_size: int, device: torch.device) -> dict:
    """Warm-up, then `cfg.bench.steps` timed steps of forward, loss, backward, optimizer."""
    bench = cfg.bench
    torch.manual_seed(cfg.seed)
    set_tf32(uses_tf32(cfg.precision))
    torch.backends.cudnn.benchmark = bool(bench.cudnn_benchmark)
    memory_format = torch.channels_last_3d if bench.channels_last_3d else torch.contiguous_format
    module = instantiate(cfg.module).to(device).to(memory_format=memory_format).train()
    forward: Callable = torch.compile(module.net) if bench.compile else module.net
    fused = (
        bool(bench.fused_adam)
        and device.type == "cuda"
        and "adam" in cfg.optimizer.optimizer._target_.lower()
    )
    optimizer = instantiate(cfg.optimizer.optimizer, **({"fused": True} if fused else {}))(
        module.parameters()
    )
    dtype = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    shape = (batch_size, cfg.task.in_channels, *cfg.task.patch_size)
    inputs = [
        (
            torch.randn(shape, device=device).to(memory_format=memory_format),
            torch.randint(
                0, len(cfg.task.labels), (batch_size, 1, *cfg.task.patch_size), device=device
            ).float(),
        )
        for _ in range(bench.input_sets)
    ]

    def step(x, y, clock: PhaseClock | None = None) -> torch.Tensor:
        tick = clock.mark if clock else (lambda: None)
        optimizer.zero_grad(set_to_none=True)
        tick()
        with autocast(cfg.precision, device):
            logits = forward(x)
        tick()
        loss = module.compute_loss(logits, y)  # the training code path: fp32 reductions
        tick()
        scaler.scale(loss).backward()
        tick()
        scaler.step(optimizer)
        scaler.update()
        tick()
        return loss

    with FlopCounterMode(display=False) as counter:  # forward + backward of one step, counted once
        step(*inputs[0])
    flops = counter.get_total_flops()
    for i in range(bench.warmup):
        step(*inputs[i % len(inputs)])
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times: dict[str, list[float]] = {phase: [] for phase in PHASES}
    for i in range(bench.steps):
        clock = PhaseClock(device)
        loss = step(*inputs[i % len(inputs)], clock)
        phases = clock.durations()
        for phase, seconds in zip(PHASES, [*phases, sum(phases)], strict=True):
            times[phase].append(seconds)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {float(loss)}")
    total = statistics.median(times["total"])
    voxels = batch_size * torch.tensor(cfg.task.patch_size).prod().item()
    return {
        "median_s": {k: statistics.median(v) for k, v in times.items()},
        "iqr_s": {k: _iqr(v) for k, v in times.items()},
        "peak_memory_gib": peak_memory_gib(device),
        "samples_per_s": batch_size / total,
        "voxels_per_s": voxels / total,
        "train_step_gflop": flops / 1e9,
        "tflop_per_s": flops / total / 1e12,
        "loss": float(loss),
    }


def _iqr(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4)
    return q[2] - q[0]
