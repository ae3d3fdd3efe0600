"""The layout version of lightning_seg checkpoints, and the steps that bring older layouts up to date.

Every checkpoint carries `lightning_seg_format` (none: version 0). Loading runs the migrations
N -> N+1 up to FORMAT_VERSION and refuses a newer checkpoint by name. Changing what a checkpoint holds
means: FORMAT_VERSION + 1, a migration in MIGRATIONS, and a test that an old checkpoint
(tests/fixtures/) still loads.
"""

from collections.abc import Callable
from pathlib import Path

import torch

from lightning_seg.errors import UserError

FORMAT_KEY = "lightning_seg_format"
FORMAT_VERSION = 1


class CheckpointFormatError(UserError):
    """A checkpoint this version of lightning_seg cannot read; the message names the file and the version."""


def _v0_to_v1(checkpoint: dict) -> None:
    """Version 0 (before the format key): its layout is version 1's, nothing to change."""


# from version N to N + 1, applied in place; one entry for every version below FORMAT_VERSION
MIGRATIONS: dict[int, Callable[[dict], None]] = {0: _v0_to_v1}


def format_version(checkpoint: dict, source: str | Path = "checkpoint") -> int:
    """The checkpoint's format version (0 when it has none)."""
    version = checkpoint.get(FORMAT_KEY, 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise CheckpointFormatError(f"{source}: {FORMAT_KEY}={version!r} is not a format version")
    return version


def stamp(checkpoint: dict) -> None:
    """Mark a checkpoint being saved with this code's format version."""
    checkpoint[FORMAT_KEY] = FORMAT_VERSION


def upgrade(checkpoint: dict, source: str | Path = "checkpoint") -> dict:
    """Migrate `checkpoint` in place to FORMAT_VERSION (and return it); refuse one from a newer version."""
    version = format_version(checkpoint, source)
    if version > FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{source}: written by a newer lightning_seg (format {version}); this one reads up to "
            f"{FORMAT_VERSION}: upgrade lightning_seg to load it"
        )
    while version < FORMAT_VERSION:
        MIGRATIONS[version](checkpoint)
        version += 1
        checkpoint[FORMAT_KEY] = version
    return checkpoint


def load_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """(checkpoint, its run config): the file as plain data (`weights_only=True`) on the CPU, migrated
    to FORMAT_VERSION; one training did not write is refused."""
    checkpoint = upgrade(torch.load(path, map_location="cpu", weights_only=True), path)
    config = checkpoint.get("hyper_parameters", {}).get("run_config")
    if not config:
        raise CheckpointFormatError(f"{path}: no run_config in it (not written by lightning_seg training)")
    return checkpoint, config
