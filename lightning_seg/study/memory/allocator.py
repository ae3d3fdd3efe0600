"""What a CUDA caching allocator would count for a computation run on fake tensors.

A `TorchDispatchMode` that sees every op's outputs: each new storage is charged, rounded as the
caching allocator rounds a request (to a multiple of 512 bytes: `torch.cuda.max_memory_allocated`
counts these block sizes), and released when the storage dies (a weakref finalizer: fake tensors keep
Python's and autograd's reference counting, so lifetimes are the real ones). The peak is taken after
every op, when the op's outputs and every input still referenced are alive together, as on a GPU.

Each storage carries a `kind` for the breakdown: `weights`, `gradients`, `optimizer` and `input` are
set by the caller; everything else is named after the phase that created it (`forward` and `loss`
tensors alive at the peak are the saved activations, `backward` and `optimizer` ones the transients).

Not counted, as in `max_memory_allocated`: the CUDA context and cuBLAS/cuDNN handles. Not seen by a
fake tensor: cuDNN workspaces (they come from the caching allocator and count on a GPU; which
algorithm cuDNN picks, and so its workspace, is only known on the card) and the unused tail of a
block the allocator chose not to split (at most 1 MiB per tensor over 1 MiB).
`lightning_seg.study.memory.step` adds a fixed allowance for the first.
"""

import math
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

BLOCK_BYTES = 512  # c10/cuda/CUDACachingAllocator.cpp kMinBlockSize: every request is a multiple


def allocator_bytes(nbytes: int) -> int:
    """The block size the CUDA caching allocator charges for a request of `nbytes`."""
    return 0 if nbytes == 0 else math.ceil(nbytes / BLOCK_BYTES) * BLOCK_BYTES


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
        self.current = 0
        self.peak = 0
        self.peak_blocks: list[Block] = []

    def track(self, tensors, kind: str | None = None) -> None:
        """Charge the storages of `tensors` (params, inputs: created before the mode) as `kind`,
        or re-label them if charged already (a gradient is made in backward, then kept)."""
        for t in tree_flatten(tensors)[0]:
            if isinstance(t, torch.Tensor):
                self._charge(t.untyped_storage(), kind or self.phase)

    def reset_peak(self) -> None:
        self.peak, self.peak_blocks = self.current, list(self.live.values())

    def breakdown(self) -> dict[str, int]:
        """Bytes per kind at the peak (kinds as labelled now, so later re-labels count)."""
        out: dict[str, int] = {}
        for block in self.peak_blocks:
            out[block.kind] = out.get(block.kind, 0) + block.nbytes
        return out

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
        weakref.finalize(storage, self._release, key, block)

    def _release(self, key: int, block: Block) -> None:
        if self.live.get(key) is block:
            del self.live[key]
            self.current -= block.nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._charge(t.untyped_storage(), self.phase)
        if self.current > self.peak:
            self.reset_peak()
        return out
