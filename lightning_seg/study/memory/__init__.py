"""What fits on my GPU: training and inference memory predicted on the CPU, per precision.

`python -m lightning_seg.study.memory` (console: `lightning-seg-plan`) runs it from the configs; from code:

    from lightning_seg.study.memory import largest_batch, train_step_memory
    step = train_step_memory(cfg)                 # StepMemory: peak_bytes, breakdown
    batch, peak = largest_batch(cfg, free_bytes)  # for data.batch_size=auto
"""

from lightning_seg.study.memory.fit import GPUS, card_budget, fit_table, largest_batch, largest_patch
from lightning_seg.study.memory.sliding_window import largest_volume, sliding_window_memory
from lightning_seg.study.memory.step import StepMemory, train_step_memory

__all__ = ["GPUS", "StepMemory", "card_budget", "fit_table", "largest_batch", "largest_patch",
           "largest_volume", "sliding_window_memory", "train_step_memory"]  # fmt: skip
