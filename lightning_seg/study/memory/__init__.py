"""What fits on my GPU: training and inference memory predicted on the CPU, per precision.

`python -m lightning_seg.study.memory` (console: `lightning-seg-plan`) runs it from the training configs.
From code:

    from lightning_seg.study.memory import predict_step, largest_batch
    plan = predict_step(cfg)                          # StepPlan: peak_bytes, breakdown
    batch, peak = largest_batch(cfg, free_bytes)      # for data.batch_size=auto

Modules, one concept each: `allocator` (what the CUDA caching allocator would count, on fake
tensors), `cuda_autocast` (CUDA's autocast cast rules applied on the CPU), `step` (one warm training
step), `sliding_window` (whole-volume inference), `fit` (largest batch and patch per card).
"""

from lightning_seg.study.memory.fit import GPUS, card_budget, fit_table, largest_batch, largest_patch
from lightning_seg.study.memory.sliding_window import largest_volume, predict_sliding_window
from lightning_seg.study.memory.step import StepPlan, predict_step

__all__ = [
    "GPUS",
    "StepPlan",
    "card_budget",
    "fit_table",
    "largest_batch",
    "largest_patch",
    "largest_volume",
    "predict_sliding_window",
    "predict_step",
]
