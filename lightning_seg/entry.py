"""What an entry point shows when a user's input is wrong: one `error: ...` line, exit code 2.

A `UserError` (a broken dataset, a config value that cannot work), an unset `???` value, or an
`OSError` on a path the user chose (a file where a folder should be, no permission, a full disk) is
printed as its message alone, also where Hydra or OmegaConf wrapped it; anything else is a bug and
keeps its traceback. `verbose=true` or `HYDRA_FULL_ERROR=1` prints the traceback of user errors too;
the run's log file always has it. Use it inside the task function (`with user_errors(cfg): ...`):
Hydra prints an escaping exception with a traceback, and lets the `SystemExit` through.
"""

import errno
import logging
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from lightning_seg.errors import UserError

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2  # as argparse exits on a bad command line
# an OSError with one of these on a path is the user's to fix: a file where a folder should be,
# no permission, a read-only or full disk
PATH_ERRNOS = {
    errno.ENOTDIR,
    errno.EEXIST,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
}


@contextmanager
def user_errors(cfg: DictConfig | None = None, key: str | None = None) -> Iterator[None]:
    """Turn a user error raised in the block into `error: <message>` on stderr and exit code 2.

    `key` names the setting that holds the paths written in the block (e.g. `hydra.run.dir`);
    without it, the `paths.*` key whose folder holds the failing path is named."""
    try:
        yield
    except Exception as err:
        message = user_message(err, cfg, key)
        if message is None:
            raise  # a bug: Hydra prints it with its traceback
        if wants_traceback(cfg):
            traceback.print_exc()
        report(message)
        sys.exit(EXIT_USER_ERROR)


def user_message(err: BaseException, cfg: DictConfig | None = None, key: str | None = None) -> str | None:
    """The message to show for `err`, searched along its cause chain; None when it is a bug."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, UserError):
            return str(err)
        if isinstance(err, MissingMandatoryValue):  # a `???` value (ckpt_path=, a task key) left unset
            unset = err.full_key
            return f"{unset}: not set; give it on the command line ({unset}=...) or in its config file"
        if isinstance(err, OSError) and err.errno in PATH_ERRNOS and err.filename:
            message = path_message(err, cfg, key)
            if message:
                return message
        cause = err.__cause__
        if cause is None and isinstance(err, OmegaConfBaseException | HydraException):
            # OmegaConf drops the resolver's exception from __cause__ (unless OC_CAUSE=1); it stays
            # in the context of the exception it re-raises
            cause = err.__context__
        err = cause
    return None


def path_message(err: OSError, cfg: DictConfig | None = None, key: str | None = None) -> str | None:
    """What is wrong with the path of `err` and which setting to change, or None if unexplained."""
    path = Path(err.filename)
    setting = key or _path_key(path, cfg) or "the setting that names it"
    if err.errno in (errno.ENOTDIR, errno.EEXIST):
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocker is None:
            return None
        return f"cannot create the folder {path}: {blocker} is a file, not a folder; pick another {setting}"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device holding {path}; free some space or point {setting} elsewhere"
    return f"cannot write {path} ({err.strerror}); pick a writable {setting}"


def wants_traceback(cfg: DictConfig | None) -> bool:
    """`verbose=true` in the config, or Hydra's own switch `HYDRA_FULL_ERROR=1`."""
    verbose = False
    if cfg is not None:
        try:
            verbose = bool(cfg.get("verbose", False))
        except Exception:  # an unresolvable config must not hide the error being reported
            pass
    return verbose or os.environ.get("HYDRA_FULL_ERROR") == "1"


def report(message: str) -> None:
    """`error: <message>` on stderr; in the run's log file, with the traceback being handled."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "error: %s", (message,), sys.exc_info())
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):  # the console has the line already
            handler.handle(record)


class OutputDirCheck(Callback):
    """Hydra callback: create the run (or sweep) dir before Hydra does, so that an unusable one
    (a file in its path, no permission, a full disk) is reported as one line, exit code 2. Hydra
    itself creates it outside the task function and would print a traceback."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _make_dir(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _make_dir(config, "hydra.sweep.dir")


def _make_dir(config: DictConfig, key: str) -> None:
    # the same config object Hydra resolves next: ${now:...} is cached, the time stamps agree
    path = OmegaConf.select(config, key)
    if path is None:
        return
    with user_errors(config, key):
        Path(str(path)).mkdir(parents=True, exist_ok=True)


def _path_key(path: Path, cfg: DictConfig | None) -> str | None:
    """The `paths.*` key (the run dir: `hydra.run.dir`) whose folder holds `path`."""
    paths = cfg.get("paths") if cfg is not None else None
    if not isinstance(paths, DictConfig):
        return None
    best, best_len = None, -1
    for name in paths:
        try:
            folder = Path(str(paths[name])).absolute()
        except Exception:  # e.g. ${hydra:...} outside a Hydra run
            continue
        if (path.absolute() == folder or folder in path.absolute().parents) and len(folder.parts) > best_len:
            best, best_len = name, len(folder.parts)
    if best is None:
        return None
    return "hydra.run.dir" if best == "output_dir" else f"paths.{best}"
