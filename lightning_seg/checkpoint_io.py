"""Checkpoint files that are whole or absent, never truncated: written beside their target, then renamed."""

import contextlib
import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.utilities.cloud_io import _is_local_file_protocol
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.plugins.io import TorchCheckpointIO

from lightning_seg.run_dir import open_atomic


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` beside the checkpoint, `fsync`, `os.replace`: a kill leaves the old or the new one, whole.
    Lightning's own save stages the bytes in the system temp folder and moves them: a copy, not atomic, from
    another filesystem (node-local /tmp, a shared run dir). Remote paths (s3://...) keep Lightning's save."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any = None) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
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
