"""How fast one loader worker draws training patches, and how many workers a training step needs."""

import math
import time

import numpy as np
import torch
from torch.utils.data import Dataset


def patches_per_worker_s(dataset: Dataset, min_s: float = 5.0, min_draws: int = 4) -> dict:
    """Patches per second that one thread draws from `dataset` (read, cut, augment), as a DataLoader worker
    does (torch runs one thread there), over at least `min_s` seconds of draws in random case order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        order = np.random.default_rng(0).permutation(len(dataset))
        patches = draws = 0
        start = time.perf_counter()
        while draws < min_draws or time.perf_counter() - start < min_s:
            patches += len(dataset[int(order[draws % len(order)])])
            draws += 1
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return {"patches_per_s": patches / elapsed, "draws": draws, "seconds": elapsed}


def workers_needed(consumed_per_s: float, per_worker_s: float) -> int:
    """Workers that keep up with a step consuming `consumed_per_s` patches per second."""
    return max(1, math.ceil(consumed_per_s / per_worker_s))
