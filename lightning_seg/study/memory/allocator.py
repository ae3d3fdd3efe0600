"""What the CUDA caching allocator would count (`max_memory_allocated`: not the CUDA context or handles)
for a computation on fake tensors. Not seen by a fake tensor: cuDNN workspaces (`step` adds an allowance)
and the unused tail of a block the allocator chose not to split (at most 1 MiB per tensor over 1 MiB)."""

import math
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

BLOCK_BYTES = 512  # c10/cuda/CUDACachingAllocator.cpp kMinBlockSize: every request is a multiple


def allocator_bytes(nbytes: int) -> int:
    """The block size the CUDA caching allocator charges for a request of `nbytes`."""
    return math.ceil(nbytes / BLOCK_BYTES) * BLOCK_BYTES


@dataclass(eq=False)
class Block:
    nbytes: int
    kind: str


class AllocatorModel(TorchDispatchMode):
    """Live and peak bytes of the storages created while it is active (and those `track`ed)."""

    def __init__(self) -> None:
        super().__init__()
        self.phase = "setup"
        self.live: dict[int, Block] = {}
        self.current = self.peak = 0
        self.peak_blocks: list[Block] = []  # alive at the peak, their kinds as labelled now (re-labels count)

    def track(self, tensors, kind: str | None = None) -> None:
        """Charge the storages of `tensors` (params, inputs: created before the mode) as `kind`,
        or re-label them if charged already (a gradient is made in backward, then kept)."""
        for t in tree_flatten(tensors)[0]:
            if isinstance(t, torch.Tensor):
                self._charge(t.untyped_storage(), kind or self.phase)

    def reset_peak(self) -> None:
        self.peak, self.peak_blocks = self.current, list(self.live.values())

    def _charge(self, storage: torch.UntypedStorage, kind: str) -> None:
        key = storage._cdata  # the C++ StorageImpl: one entry per storage, shared by its views
        block = self.live.get(key)
        if block is not None:
            if kind != self.phase:  # an explicit label wins over the phase it was made in
                block.kind = kind
            return
        nbytes = allocator_bytes(storage.nbytes())
        if nbytes == 0:
            return
        block = self.live[key] = Block(nbytes, kind)
        self.current += nbytes
        # fake tensors keep Python's and autograd's reference counting: the lifetimes are the real ones
        weakref.finalize(storage, self._release, key, block)

    def _release(self, key: int, block: Block) -> None:
        if self.live.get(key) is block:
            del self.live[key]
            self.current -= block.nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(out)
        if self.current > self.peak:
            self.reset_peak()
        return out
