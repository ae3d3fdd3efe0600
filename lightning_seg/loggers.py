"""A CSV logger whose metrics.csv a resumed run continues instead of emptying."""

import csv
import io
import logging
import os
from argparse import Namespace
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.core.saving import save_hparams_to_yaml
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only

from lightning_seg.run_dir import open_atomic

log = logging.getLogger(__name__)


class ResumableCSVLogger(Logger):
    """metrics.csv and hparams.yaml in `save_dir/name/version`, as Lightning's CSVLogger writes them (a row
    per log call, a `step` column, sorted columns). Written on Lightning's public Logger because its CSVLogger
    deletes an existing metrics.csv when it starts and rewrites the file in place when a column appears (a
    kill then loses every row): here `continue_before(step)` keeps a resumed run's rows before `step`, and
    every rewrite is atomic. Local paths only (the run dir is one)."""

    def __init__(
        self,
        save_dir: str | Path,
        name: str = "",
        version: str | int = 0,
        flush_logs_every_n_steps: int = 100,
    ) -> None:
        super().__init__()
        self._save_dir, self._name, self._version = os.fspath(save_dir), name, version
        self.flush_every = flush_logs_every_n_steps
        self.columns: list[str] = []
        self.pending: list[dict[str, Any]] = []
        self.metrics_file = Path(self.log_dir) / "metrics.csv"

    @property
    def name(self) -> str:
        return self._name

    @property
    def version(self) -> str | int:
        return self._version

    @property
    def save_dir(self) -> str:
        return self._save_dir

    @property
    def log_dir(self) -> str:
        version = self.version if isinstance(self.version, str) else f"version_{self.version}"
        return os.path.join(self.save_dir, self.name, version)

    @rank_zero_only
    def continue_before(self, step: int) -> None:
        """Continue the existing metrics.csv from `step` on (the resumed global step): the rows before it
        stay, the later ones, trained again, go (no step twice). Call before anything is logged."""
        if self.columns or self.pending:
            raise RuntimeError("continue_before() must come before the first log call")
        if not self.metrics_file.is_file():
            return
        with open(self.metrics_file, newline="") as file:
            text = file.read()
        if text and not text.endswith("\n"):  # a kill in the middle of an append: drop the partial row
            text = text[: text.rfind("\n") + 1]
        reader = csv.DictReader(io.StringIO(text, newline=""))
        kept = [row for row in reader if (s := _step(row)) is not None and s < step]
        self.columns = list(reader.fieldnames or [])
        self._write(self.columns, kept)
        log.info(f"continuing {self.metrics_file}: {len(kept)} rows before step {step} kept")

    @rank_zero_only
    def log_hyperparams(self, params: dict[str, Any] | Namespace, *args: Any, **kwargs: Any) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        save_hparams_to_yaml(os.path.join(self.log_dir, "hparams.yaml"), _as_dict(params))

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, Any], step: int | None = None) -> None:
        values = {k: v.item() if isinstance(v, torch.Tensor) else v for k, v in metrics.items()}
        step = len(self.pending) if step is None else step
        self.pending.append({**values, "step": step})
        if (step + 1) % self.flush_every == 0:
            self.save()

    @rank_zero_only
    def save(self) -> None:
        """Append the rows logged since the last save; a new column rewrites the file, atomically."""
        if not self.pending:
            return
        rows, self.pending = self.pending, []
        columns = sorted(set(self.columns).union(*rows))
        if columns != self.columns or not self.metrics_file.is_file():
            before = _read(self.metrics_file) if self.columns and self.metrics_file.is_file() else []
            self.columns = columns
            self._write(columns, before + rows)
            return
        with open(self.metrics_file, "a", newline="") as file:
            csv.DictWriter(file, fieldnames=columns).writerows(rows)

    @rank_zero_only
    def finalize(self, status: str) -> None:
        self.save()

    def _write(self, columns: list[str], rows: list[dict[str, Any]]) -> None:
        self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
        with open_atomic(self.metrics_file, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def _as_dict(params: dict[str, Any] | Namespace) -> dict[str, Any]:
    return vars(params) if isinstance(params, Namespace) else dict(params)


def _step(row: dict) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None
