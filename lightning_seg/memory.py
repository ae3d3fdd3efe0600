"""Peak memory of this process: GPU memory allocated by PyTorch, else the CPU resident set."""

import resource
import sys

import torch


def peak_memory_gib(device: torch.device | str) -> float:
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)
