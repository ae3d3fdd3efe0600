"""The measured side of the planner: `torch.cuda.max_memory_allocated` of real training steps on a GPU.

The step the planner predicts, run for real: the configured network, the configured (MONAI) loss in
fp32 with autocast off, the optimizer as a GPU run builds it, CUDA autocast and a grad scaler for
fp16, Lightning's order (forward and loss, zero_grad, backward, step), the averaged copy of the weights
when `callbacks.weight_average` is on, cuDNN benchmark on as training runs by default. Used by the
`gpu` tests and `make gpu-check`.
"""

import copy

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from lightning_seg.model.deep_supervision import segmentation_loss
from lightning_seg.plan.step import amp_dtype, averages_weights, build_optimizer, with_point
from lightning_seg.precision import set_tf32, uses_tf32


def measured_step_peak(
    cfg: DictConfig, batch=None, patch=None, precision=None, warmup: int = 3, steps: int = 3
) -> dict:
    """`peak_bytes`: max_memory_allocated over warm-up and steps, reset before the warm-up as the
    reference loop (`anchor_step.py`) does, so cuDNN benchmark's first-step trials count;
    `warm_peak_bytes`: over the steps after the warm-up only."""
    cfg = with_point(cfg, batch, patch, precision)
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    set_tf32(uses_tf32(cfg.precision))
    dtype = amp_dtype(cfg.precision)
    net = instantiate(cfg.model).to(device).train()
    # the copy callbacks.weight_average keeps on the GPU; its in-place update adds nothing to the peak
    averaged = copy.deepcopy(net) if averages_weights(cfg) else None
    loss_fn = instantiate(cfg.loss)
    optimizer = build_optimizer(cfg, net.parameters())
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    shape = (int(cfg.data.batch_size), int(cfg.task.in_channels), *[int(n) for n in cfg.task.patch_size])
    image = torch.randn(shape, device=device)
    label = torch.randint(0, len(cfg.task.labels), (shape[0], 1, *shape[2:]), device=device).float()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    warm = 0
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            overall = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = net(image)
        with torch.autocast("cuda", enabled=False):
            loss = segmentation_loss(loss_fn, logits.float(), label)
        del logits
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        del loss
        scaler.step(optimizer)
        scaler.update()
    torch.cuda.synchronize()
    warm = torch.cuda.max_memory_allocated()
    del net, averaged, optimizer, image, label
    torch.cuda.empty_cache()
    return {"peak_bytes": max(overall, warm), "warm_peak_bytes": warm}
