"""Checkpoint layout versions (`lightning_seg_format`, none: 0): loading migrates older ones, refuses newer.

Changing what a checkpoint holds means FORMAT_VERSION + 1, a migration in MIGRATIONS, and a test that an
old checkpoint (tests/fixtures/) still loads."""

import pickle
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from lightning_seg.errors import UserError
from lightning_seg.trust import SHOWN, UntrustedCheckpointError, check_run_config

FORMAT_KEY = "lightning_seg_format"
FORMAT_VERSION = 1
READ = ("task", "model", "module", "data")  # what the commands read from a run config: dicts in every format

# from version N to N + 1, applied in place; one entry for every version below FORMAT_VERSION
MIGRATIONS: dict[int, Callable[[dict], None]] = {
    0: lambda checkpoint: None,  # version 0 (before the format key) has version 1's layout
}


class CheckpointFormatError(UserError):
    """A checkpoint this version of lightning_seg cannot read; the message names the file and the version."""


def stamp(checkpoint: dict) -> None:
    checkpoint[FORMAT_KEY] = FORMAT_VERSION


def upgrade(checkpoint: dict, source: str | Path = "checkpoint") -> dict:
    """Migrate `checkpoint` in place to FORMAT_VERSION (and return it); refuse one from a newer version."""
    version = checkpoint.get(FORMAT_KEY, 0)
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise CheckpointFormatError(f"{source}: {FORMAT_KEY}={version!r} is not a format version")
    if version > FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{source}: written by a newer lightning_seg (format {version}); this one reads up to "
            f"{FORMAT_VERSION}: upgrade lightning_seg to load it"
        )
    for step in range(version, FORMAT_VERSION):
        MIGRATIONS[step](checkpoint)
        checkpoint[FORMAT_KEY] = step + 1
    return checkpoint


def load_checkpoint(
    path: str | Path, trusted: Iterable[str] = (), mmap: bool = False, needs_config: bool = True
) -> tuple[dict, dict]:
    """(checkpoint, its run config), plain data on the CPU, migrated: what every command that loads a
    checkpoint reads it with. Refused: pickled objects, code the run config names that the project does not
    build (`trust`, `trusted`: what the user's own config names), a newer format, no run config (unless
    `needs_config` is false: a Lightning checkpoint to resume from)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:  # weights_only refused a global: the file would run code
        named = [line for line in str(err).splitlines() if "GLOBAL" in line]  # torch's line naming it
        reason = f" ({named[0].strip()[:SHOWN]})" if named else ""
        raise UntrustedCheckpointError(
            f"{path}: holds pickled objects other than tensors and plain data{reason}; refused (SECURITY.md)"
        ) from None
    except (RuntimeError, EOFError, ValueError) as err:  # a truncated file, or not a torch file at all
        raise CheckpointFormatError(f"{path}: not a readable checkpoint ({type(err).__name__})") from err
    if not isinstance(checkpoint, dict):
        raise CheckpointFormatError(f"{path}: holds a {type(checkpoint).__name__}, not a training checkpoint")
    hparams = checkpoint.get("hyper_parameters")
    config = hparams.get("run_config") if isinstance(hparams, dict) else None
    if config:
        check_run_config(config, path, trusted)
    elif needs_config:
        raise CheckpointFormatError(f"{path}: no run_config in it (not written by lightning_seg training)")
    if needs_config and (missing := [k for k in READ if not isinstance(config.get(k), dict)]):
        raise CheckpointFormatError(f"{path}: its run_config has no {', '.join(missing)} settings")
    return upgrade(checkpoint, path), config or {}
