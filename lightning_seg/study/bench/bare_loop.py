"""The bare PyTorch loop beside the project's step (`bench.bare_loop=true`): the step without Lightning, its
callbacks or module. The memory planner predicts it too; docs/benchmarks/gpu_anchors.md holds H200 figures."""

import statistics

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_seg.model.cpu_bf16 import fp32_where_bf16_conv_fails
from lightning_seg.model.deep_supervision import segmentation_loss
from lightning_seg.precision import autocast, autocast_dtype, set_tf32, uses_tf32
from lightning_seg.study.callbacks.peak_memory import peak_memory_gib
from lightning_seg.study.callbacks.step_breakdown import PhaseClock
from lightning_seg.study.step_trainer import synthetic_batches


def run(cfg: DictConfig, batch_size: int, device: torch.device) -> dict:
    torch.manual_seed(cfg.seed)
    torch.backends.cudnn.benchmark = True
    set_tf32(uses_tf32(cfg.precision))
    # the module's network as it trains: oneDNN's failing bf16 convolutions in fp32 (a bare CPU bf16 loop
    # without it went NaN now and then, as the project's step did before)
    net = fp32_where_bf16_conv_fails(instantiate(cfg.model)).to(device).train()
    forward = torch.compile(net) if cfg.speed.compile else net
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(cfg.precision, device) == torch.float16)
    loss_fn = instantiate(cfg.loss)
    batches = synthetic_batches(cfg, batch_size, device, cfg.bench.warmup + cfg.bench.steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    timed = []
    for batch in batches:
        clock = PhaseClock(device.type == "cuda")
        optimizer.zero_grad(set_to_none=True)
        clock.mark("start")
        with autocast(cfg.precision, device):
            logits = forward(batch["image"])
        clock.mark("forward")
        loss = segmentation_loss(loss_fn, logits.float(), batch["label"])
        clock.mark("loss")
        scaler.scale(loss).backward()
        clock.mark("backward")
        scaler.step(optimizer)
        scaler.update()
        clock.mark("optimizer")
        timed.append(clock.durations())
    if not torch.isfinite(loss):
        raise FloatingPointError(f"bare loop: non-finite loss {float(loss)}")
    median = {k: statistics.median(step[k] for step in timed[cfg.bench.warmup :]) for k in timed[0]}
    return {"median_s": median, "peak_memory_gib": peak_memory_gib(device), "loss": float(loss)}
