"""A training run's folder. Every command that reads or writes a run goes through `RunDir`, so the layout is
spelled out once; files are written whole or not at all (`open_atomic`: under a hidden `tmp_path` beside the
target, then renamed; a resume in place removes the temporaries a kill left).

    RUN/checkpoints/last.ckpt, best-*.ckpt   RUN/csv/metrics.csv      RUN/split.json
    RUN/environment.json                     RUN/final_metrics.json   RUN/.hydra/config.yaml
    RUN/hpc_ckpt_*.ckpt (SLURM requeue)      RUN/wandb/run_id         RUN/time_to_accuracy.json
    RUN/diverged.json (the loss or weights turned non-finite: where, and the error)
"""

import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from lightning_seg.data.layout import case_name
from lightning_seg.errors import ConfigError, MissingFileError

log = logging.getLogger(__name__)

_TMP = re.compile(r"^\..+\.\d+(-\d+)?\.tmp$")  # pid-thread; pid alone: older temporaries


def tmp_path(path: str | Path) -> Path:
    """Hidden, beside `path` (the rename stays on one filesystem), per process and thread (two threads
    writing one file each rename their own whole copy), not taken for a `.ckpt`."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{threading.get_native_id()}.tmp")


@contextmanager
def open_atomic(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
    """`open(path, mode)` through `tmp_path`: a kill or an error leaves the old content or the new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        with open(tmp, mode, **kwargs) as file:
            yield file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, text: str) -> None:
    with open_atomic(path) as file:
        file.write(text)


def write_json(path: str | Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2))


def _part(relative: str) -> property:
    return property(lambda run: run.path / relative)


class RunDir:
    """The folder of one training run (`paths.output_dir`, Hydra's run dir)."""

    checkpoints = _part("checkpoints")
    last_checkpoint = _part("checkpoints/last.ckpt")
    metrics_csv = _part("csv/metrics.csv")
    hparams_yaml = _part("csv/hparams.yaml")
    config_yaml = _part(".hydra/config.yaml")
    split_json = _part("split.json")
    environment_json = _part("environment.json")
    final_metrics_json = _part("final_metrics.json")
    time_to_accuracy_json = _part("time_to_accuracy.json")
    diverged_json = _part("diverged.json")
    val_images = _part("val_images")
    wandb_run_id = _part("wandb/run_id")

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def of_checkpoint(cls, ckpt_path: str | Path) -> "RunDir":
        """The run that wrote a checkpoint of its `checkpoints/` folder."""
        return cls(Path(ckpt_path).resolve().parent.parent)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def newest_checkpoint(self) -> Path | None:
        """The newest of `last.ckpt` and the `hpc_ckpt_*.ckpt` Lightning writes on SLURM's requeue signal."""
        candidates = [p for p in [self.last_checkpoint, *self.path.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
        return max(candidates, key=lambda p: p.stat().st_mtime, default=None)

    def remove_stale_tmp(self) -> None:
        """Delete the half-written files (`tmp_path`) a killed process left."""
        for folder in (self.path, self.checkpoints, self.metrics_csv.parent):
            for stale in folder.glob(".*.tmp"):
                if _TMP.match(stale.name):
                    log.info("removing %s, left by a process killed while writing it", stale)
                    stale.unlink(missing_ok=True)

    def write_split(self, split: dict[str, list]) -> None:
        write_atomic(self.split_json, json.dumps(split, indent=1))

    def read_split(self) -> dict[str, list]:
        if not self.split_json.is_file():
            raise MissingFileError(f"{self.split_json}: missing, so the run's split is unknown")
        return json.loads(self.split_json.read_text())

    def cases_of_split(self, cases: list[dict[str, str]], split: str, source: str) -> list[dict[str, str]]:
        """The cases of `source` (a task folder's listing) in one part (train, val, test) of this run's
        split, matched by label file name; `all`: every case."""
        if split == "all":
            return cases
        if not self.split_json.is_file():
            raise MissingFileError(f"{self.split_json}: missing, so split={split} is unknown; use split=all")
        names = {case_name(c) for c in self.read_split().get(split, [])}
        if not names:
            raise ConfigError(
                f"{self.split_json}: no '{split}' cases (train with data.test_fraction > 0 for a test split)"
            )
        chosen = [c for c in cases if case_name(c) in names]
        if len(chosen) != len(names):
            raise MissingFileError(
                f"{source}: holds {len(chosen)} of the {len(names)} '{split}' cases of {self.split_json}"
            )
        return chosen
