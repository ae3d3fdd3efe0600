"""Checkpoints a killed run resumes from: last.ckpt at every validation and every few minutes."""

import logging
import os
import time
from pathlib import Path
from typing import Any

from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loops.utilities import _is_max_limit_reached
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import Tensor

log = logging.getLogger(__name__)


class ResumableCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint (best by the monitor, `last.ckpt`) made safe to be killed: `last.ckpt` at
    every validation, improved or not (Lightning 2.6 rewrites it only with a new top-k), every `every_min`
    minutes of training (alone: Lightning's `train_time_interval` would rank a stale metric into the top k),
    at the run's last step (max_steps, max_time, an epoch without validation) and on SIGTERM, but not during a
    validation (Lightning resumes a mid-validation checkpoint by skipping that validation); loggers flushed
    first; a replaced best deleted once `last.ckpt` names the new one. Atomic writes: `AtomicCheckpointIO`."""

    @property
    def state_key(self) -> str:
        # Lightning keys a callback's state by its class name: ModelCheckpoint's key, so best score and
        # paths load from checkpoints written before this subclass existed
        return super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)

    def __init__(self, *args: Any, every_min: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if every_min is not None and every_min <= 0:
            raise ValueError(f"checkpoint_every_min must be positive or null, got {every_min}")
        if self.save_last == "link":
            raise ValueError(
                "save_last='link' would point last.ckpt at an older checkpoint: use save_last=true"
            )
        self.every_s = None if every_min is None else float(every_min) * 60.0
        self._last_written_at = time.monotonic()
        self._last_written_step: int | None = None
        self._last_writes = 0
        self._deferred_removals: list[str] = []
        self._resumed_in_place = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_written_at = time.monotonic()
        if self._resumed_in_place and trainer.is_global_zero:
            self._remove_unknown_checkpoints(trainer)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.save_last or not self._may_save(trainer):
            return
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return  # validation or the epoch end comes next; a SIGTERM is handled in on_exception
        # a stop mid-epoch (max_steps, max_time): no validation follows, and Lightning resumes a
        # checkpoint of this hook exactly as a timed one
        timed = self.every_s is not None and time.monotonic() - self._last_written_at >= self.every_s
        due = _stops(trainer) or trainer.received_sigterm or timed
        if trainer.world_size > 1:  # one decision for all processes: saving is collective
            due = trainer.strategy.broadcast(due)
        if due and self._last_written_step != trainer.global_step:
            top_k_step = self._last_global_step_saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            # last.ckpt alone: a validation at this step must still rank its metric into the top k
            self._last_global_step_saved = top_k_step

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writes = self._last_writes
        super().on_train_epoch_end(trainer, pl_module)
        missed = self._should_save_on_train_epoch_end(trainer) and self._last_writes == writes
        # a run ending after an epoch without validation: here, not on the epoch's last batch (Lightning
        # resumes that one without counting the next epoch's start) nor in on_train_end (resumed with
        # max_steps, that one skips the next epoch)
        run_ends = self._last_written_step != trainer.global_step and _stops(trainer, epoch_end=True)
        if missed or run_ends:
            self._save_last_after_validation(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writes = self._last_writes
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer) and self._last_writes == writes:
            self._save_last_after_validation(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        sigterm = isinstance(exception, SIGTERMException) and self.save_last and self._may_save(trainer)
        if sigterm and trainer.global_step not in (0, self._last_written_step):
            if trainer.validating:
                log.warning(
                    f"SIGTERM during validation: last.ckpt stays at step {self._last_written_step}, "
                    f"written {time.monotonic() - self._last_written_at:.0f} s before"
                )
            else:
                log.info("SIGTERM: writing last.ckpt at step %d before stopping", trainer.global_step)
                self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._remove_deferred(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        self._remove_deferred(trainer)

    def _save_last_after_validation(self, trainer: Trainer) -> None:
        if self.save_last and self._may_save(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    @staticmethod
    def _may_save(trainer: Trainer) -> bool:
        return not (trainer.fast_dev_run or trainer.sanity_checking) and trainer.state.fn == TrainerFn.FITTING

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        if trainer.is_global_zero:
            for logger in trainer.loggers:  # every row logged so far is on disk before the checkpoint
                logger.save()
        super()._save_checkpoint(trainer, filepath)

    def _save_last_checkpoint(self, trainer: Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        super()._save_last_checkpoint(trainer, monitor_candidates)
        if self.save_last:
            self._last_written_at = time.monotonic()
            self._last_written_step = trainer.global_step
            self._last_writes += 1
            self._remove_deferred(trainer)

    def _remove_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        # a replaced best stays until last.ckpt, which names its successor, is written: a kill in
        # between leaves an extra file (removed on resume), never a state pointing at a deleted one
        if self.save_last:
            self._deferred_removals.append(filepath)
        else:
            super()._remove_checkpoint(trainer, filepath)

    def _remove_deferred(self, trainer: Trainer) -> None:
        removals, self._deferred_removals = self._deferred_removals, []
        for filepath in removals:
            if filepath not in self.best_k_models and filepath != self.last_model_path:
                super()._remove_checkpoint(trainer, filepath)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_dir = state_dict.get("dirpath")
        same = saved_dir and self.dirpath and os.path.realpath(saved_dir) == os.path.realpath(self.dirpath)
        self._resumed_in_place = bool(same)
        if same:  # the same folder spelled differently (relative, through a symlink) is the same folder
            super().load_state_dict({**state_dict, "dirpath": self.dirpath})
        else:  # a new run from another run's checkpoint ranks its own checkpoints, in its own folder
            log.info(
                "checkpoint from %s: best checkpoint tracking starts anew in %s", saved_dir, self.dirpath
            )

    def _remove_unknown_checkpoints(self, trainer: Trainer) -> None:
        """After a resume in place: delete the checkpoints the restored state does not know, written
        after the checkpoint this run resumed from (a best replaced, a kill before last.ckpt followed)."""
        tracked = [*self.best_k_models, self.best_model_path, self.last_model_path, trainer.ckpt_path]
        known = {os.path.realpath(p) for p in tracked if p}
        for path in Path(self.dirpath).glob(f"*{self.FILE_EXTENSION}"):
            if path.name.startswith(self.CHECKPOINT_NAME_LAST) or os.path.realpath(path) in known:
                continue
            log.info("removing %s: written after the checkpoint this run resumes from", path)
            path.unlink(missing_ok=True)


def _stops(trainer: Trainer, epoch_end: bool = False) -> bool:
    """Whether fit stops after this training batch, or (`epoch_end`) after this epoch: the fit loop's
    own tests (max_time's Timer has set should_stop before the checkpoint callbacks run)."""
    fit = trainer.fit_loop
    return (
        _is_max_limit_reached(trainer.global_step, trainer.max_steps)
        or (trainer.should_stop and fit._can_stop_early)
        or (epoch_end and _is_max_limit_reached(fit.epoch_progress.current.processed, fit.max_epochs))
    )
