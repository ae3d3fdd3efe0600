"""The bare PyTorch loop the benchmark runs beside the project's step: what the step would cost
without Lightning, callbacks or the module around it.

The same network (`cfg.model`), loss (`cfg.loss`, on fp32 logits) and precision as the grid point;
Adam (fused on a GPU), cuDNN benchmark on, two random input sets rotated, `zero_grad` first, phases
timed as `StepBreakdown` times the project's (CUDA events on a GPU, the host clock on a CPU). The memory
planner predicts this loop too (`train_step_memory(..., loop="bare")`). `bench.bare_loop=true` adds it to
every grid point; docs/benchmarks/gpu_anchors.md holds the figures it gave on an H200.
"""

import statistics

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_seg.model.deep_supervision import segmentation_loss
from lightning_seg.precision import autocast, autocast_dtype, set_tf32, uses_tf32
from lightning_seg.study.callbacks.peak_memory import peak_memory_gib
from lightning_seg.study.callbacks.step_breakdown import PhaseClock


def run(cfg: DictConfig, batch_size: int, device: torch.device) -> dict:
    """`cfg.bench.warmup` + `cfg.bench.steps` bare steps at the config's point; medians per phase."""
    torch.manual_seed(cfg.seed)
    torch.backends.cudnn.benchmark = True
    set_tf32(uses_tf32(cfg.precision))
    net = instantiate(cfg.model).to(device).train()
    forward = torch.compile(net) if cfg.speed.compile else net
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(cfg.precision, device) == torch.float16)
    loss_fn = instantiate(cfg.loss)
    shape = (batch_size, int(cfg.task.in_channels), *cfg.task.patch_size)
    inputs = [
        (
            torch.randn(shape, device=device),
            torch.randint(0, len(cfg.task.labels), (batch_size, 1, *shape[2:]), device=device).float(),
        )
        for _ in range(2)
    ]
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    timed = []
    for i in range(cfg.bench.warmup + cfg.bench.steps):
        image, label = inputs[i % 2]
        clock = PhaseClock(device.type == "cuda")
        optimizer.zero_grad(set_to_none=True)
        clock.mark("start")
        with autocast(cfg.precision, device):
            logits = forward(image)
        clock.mark("forward")
        loss = segmentation_loss(loss_fn, logits.float(), label)
        clock.mark("loss")
        scaler.scale(loss).backward()
        clock.mark("backward")
        scaler.step(optimizer)
        scaler.update()
        clock.mark("optimizer")
        seconds = clock.durations()
        if i >= cfg.bench.warmup:
            timed.append(seconds)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"bare loop: non-finite loss {float(loss)}")
    return {
        "median_s": {k: statistics.median(step[k] for step in timed) for k in timed[0]},
        "peak_memory_gib": peak_memory_gib(device),
        "loss": float(loss),
    }
