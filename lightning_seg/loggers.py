"""A CSV logger whose metrics.csv a resumed run continues instead of emptying."""

import csv
import io
import logging

from lightning_fabric.loggers.logger import rank_zero_experiment
from lightning_fabric.utilities.cloud_io import _is_local_file_protocol
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter

from lightning_seg.run_dir import open_atomic

log = logging.getLogger(__name__)


class ResumableCSVLogger(CSVLogger):
    """Lightning's CSVLogger; after `continue_before(step)` (the resumed global step) an existing metrics.csv
    keeps its rows before `step` (the later ones, trained again, go: no step twice); rewrites are atomic."""

    _continue_before: int | None = None

    def continue_before(self, step: int) -> None:
        """Continue the existing metrics.csv from `step` on; call before anything is logged."""
        if self._experiment is not None:
            raise RuntimeError("continue_before() must come before the first log call")
        self._continue_before = step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuedWriter(self.log_dir, self._continue_before)
        return self._experiment


class _ContinuedWriter(ExperimentWriter):
    def __init__(self, log_dir: str, continue_before: int | None) -> None:
        self.continue_before = continue_before
        super().__init__(log_dir)  # calls _check_log_dir_exists

    def _check_log_dir_exists(self) -> None:
        if self.continue_before is None or not self._fs.isfile(self.metrics_file_path):
            super()._check_log_dir_exists()  # a fresh run: Lightning's warning, the old file goes
            return
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            text = file.read()
        if text and not text.endswith("\n"):  # a kill in the middle of an append: drop the partial row
            text = text[: text.rfind("\n") + 1]
        reader = csv.DictReader(io.StringIO(text, newline=""))
        self.metrics_keys = list(reader.fieldnames or [])
        kept = [row for row in reader if _step(row) is not None and _step(row) < self.continue_before]
        self._write_rows(self.metrics_keys, kept)
        log.info(
            f"continuing {self.metrics_file_path}: {len(kept)} rows before step {self.continue_before} kept"
        )

    def _rewrite_with_new_header(self, fieldnames: list[str]) -> None:
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            rows = list(csv.DictReader(file))
        self._write_rows(fieldnames, rows)

    def _write_rows(self, fieldnames: list[str], rows: list[dict]) -> None:
        opener = open_atomic if _is_local_file_protocol(self.metrics_file_path) else self._fs.open
        with opener(self.metrics_file_path, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(rows)


def _step(row: dict) -> int | None:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None
