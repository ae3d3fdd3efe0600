"""Checkpoint files that are whole or absent, never truncated: written beside their target, then renamed."""

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from fsspec.utils import get_protocol
from pytorch_lightning.plugins.io import TorchCheckpointIO

from lightning_seg.run_dir import open_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` beside the checkpoint, `fsync`, `os.replace`: a kill leaves the old or the new one, whole.
    Lightning's own save stages the bytes in the system temp folder and moves them: a copy, not atomic, from
    another filesystem (node-local /tmp, a shared run dir). Remote paths (s3://...) keep Lightning's save.
    With `hold_removals` (set by `ResumableCheckpoint`), removals wait for `release_removals`."""

    def __init__(self) -> None:
        super().__init__()
        self.hold_removals = False
        self.held: list[str] = []

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None):
        if storage_options is not None or get_protocol(str(path)) != "file":
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with open_atomic(path, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())  # the data reaches the disk before the name points at it
        # persist the rename too (a power cut must not bring the old name back); not every filesystem can
        with contextlib.suppress(OSError):
            folder = os.open(Path(path).parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)

    def remove_checkpoint(self, path: str | Path) -> None:
        if self.hold_removals:
            self.held.append(str(path))
        else:
            super().remove_checkpoint(path)

    def release_removals(self, keep: set[str]) -> None:
        """Remove the held checkpoints but those in `keep` (named again since)."""
        held, self.held = self.held, []
        for path in held:
            if path not in keep:
                super().remove_checkpoint(path)
