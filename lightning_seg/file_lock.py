"""One process at a time where several may write the same files: sweep points or DDP nodes sharing a data or
cache folder. An flock, so a killed holder releases it with its process and leaves nothing to clean up."""

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


@contextlib.contextmanager
def exclusive(lock: Path, writing: Path) -> Iterator[None]:
    """Hold `lock` (created where missing) for the block; say so when waiting for another process."""
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process writing %s", writing)
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
