"""Checkpoint files that are whole or absent, never truncated: written beside their target, then renamed."""

import os
from pathlib import Path
from typing import Any

import torch
from lightning_fabric.utilities.cloud_io import _is_local_file_protocol
from lightning_fabric.utilities.types import _PATH
from pytorch_lightning.plugins.io import TorchCheckpointIO

from lightning_seg.run_dir import tmp_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """`torch.save` into a temporary file in the checkpoint's own folder, `fsync`, then `os.replace`:
    a process killed at any moment leaves the previous checkpoint or the new one, whole.

    Lightning's own save stages the bytes in the system temp folder and moves them over, which is a
    copy into the target (and not atomic) when that folder is another filesystem, as node-local /tmp
    and a shared run dir usually are. Remote paths (s3://, ...) keep Lightning's save.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None or not _is_local_file_protocol(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = tmp_path(path)
        try:
            with open(tmp, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())  # the data reaches the disk before the name points at it
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (a power cut after it must not bring the old name back)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform or filesystem; the rename is atomic all the same
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
