"""What an entry point shows when a user's input is wrong (`user_message`): one `error: ...` line, exit 2.

Use it inside the task function: Hydra prints an escaping exception with a traceback, and lets `SystemExit`
through. `verbose=true` or `HYDRA_FULL_ERROR=1` prints the traceback too; the run's log file always has it."""

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

from lightning_seg.errors import JobFailed, UserError

log = logging.getLogger(__name__)

EXIT_USER_ERROR = 2  # as argparse exits on a bad command line
NOT_A_FOLDER = {errno.ENOTDIR, errno.EEXIST}  # a file where a folder should be
NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
# an OSError with one of these on a path is the user's to fix (also: no permission, a read-only disk)
PATH_ERRNOS = NOT_A_FOLDER | NO_SPACE | {errno.EACCES, errno.EPERM, errno.EROFS}


@contextmanager
def user_errors(cfg: DictConfig | None = None, key: str | None = None) -> Iterator[None]:
    """A user error in the block: `error: <message>` on stderr, exit code 2. `key`: the setting naming the
    block's paths (`hydra.run.dir`); by default, the `paths.*` key whose folder holds the failing path."""
    try:
        yield
    except Exception as err:
        message = user_message(err, cfg, key)
        if message is None:
            raise  # a bug: Hydra prints it with its traceback
        if wants_traceback(cfg):
            traceback.print_exc()
        report(message)
        if os.environ.get("SUBMITIT_EXECUTOR"):
            # a submitit job (a SLURM sweep point) that exits leaves no result; the launcher then waits for
            # one until SLURM's accounting says the job failed, forever on a cluster without it. Raised,
            # submitit stores the error as the result and the launcher re-raises it.
            raise JobFailed(message) from None
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
            if message := path_message(err, cfg, key):
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
    if err.errno in NOT_A_FOLDER:
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocker is None:
            return None
        return f"cannot create the folder {path}: {blocker} is a file, not a folder; pick another {setting}"
    if err.errno in NO_SPACE:
        return f"no space left on the device holding {path}; free some space or point {setting} elsewhere"
    return f"cannot write {path} ({err.strerror}); pick a writable {setting}"


def wants_traceback(cfg: DictConfig | None) -> bool:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return True
    try:
        return cfg is not None and bool(cfg.get("verbose", False))
    except Exception:  # an unresolvable config must not hide the error being reported
        return False


def report(message: str) -> None:
    """`error: <message>` on stderr; in the run's log file, with the traceback being handled."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "error: %s", (message,), sys.exc_info())
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):  # the console has the line already
            handler.handle(record)


class OutputDirCheck(Callback):
    """Hydra callback: create the run (or sweep) dir before Hydra does, so that an unusable one is
    reported as one line, exit code 2 (Hydra creates it outside the task function, with a traceback)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        _make_dir(config, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        _make_dir(config, "hydra.sweep.dir")


def _make_dir(config: DictConfig, key: str) -> None:
    # the same config object Hydra resolves next: ${now:...} is cached, the time stamps agree
    path = OmegaConf.select(config, key)
    if path is not None:
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
        if path.absolute().is_relative_to(folder) and len(folder.parts) > best_len:
            best = "hydra.run.dir" if name == "output_dir" else f"paths.{name}"
            best_len = len(folder.parts)
    return best
