"""The training task: compose-time config in, trained model and metrics out."""

import logging
import signal
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import get_class, get_method, instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning import Trainer, seed_everything
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lightning_seg.config import CONFIG_DIR
from lightning_seg.data.datamodule import SPLIT_KEY
from lightning_seg.distributed import in_slurm_job, prepare_once_per_node
from lightning_seg.entry import user_errors, user_message
from lightning_seg.environment import environment_info, known_problems
from lightning_seg.errors import TrainingDiverged
from lightning_seg.loggers import ResumableCSVLogger
from lightning_seg.precision import AUTO, set_tf32, uses_tf32
from lightning_seg.requeue import exit_if_requeued
from lightning_seg.resume import Resume, find_checkpoint, prepare_in_place, wandb_run_id
from lightning_seg.run_dir import RunDir, write_json
from lightning_seg.sweep import in_multirun
from lightning_seg.task import check_task
from lightning_seg.trainers import LIGHTNING_OWN_DEPRECATION, build_trainer
from lightning_seg.trust import named_by

log = logging.getLogger(__name__)

# Lightning warnings a resume expects, filtered only around a resumed fit
RESUME_WARNINGS = (
    r"Checkpoint directory .* exists and is not empty",  # in place: the run's own checkpoints are there
    # a mid-epoch last.ckpt: the rest of the epoch draws its patches from a fresh shuffle, as every epoch does
    r"You're resuming from a checkpoint that ended before the epoch ended",
)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """`python train.py ...` in a checkout, `lightning-seg-train ...` anywhere."""
    with exit_if_requeued(), user_errors(cfg):  # a broken dataset, config or path: one `error:` line, exit 2
        try:
            metrics, _ = train(cfg)
        except TrainingDiverged as err:
            if not in_multirun():
                raise
            # a result of the sweep, recorded in the run dir: the next job runs (lightning_seg.sweep)
            log.error("%s; the sweep goes on", err)
            return float("nan")  # Optuna marks the trial failed
    return metrics.get("best/val_dice")  # what a Hydra sweeper optimizes


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit; return final metrics and the objects. `ckpt_path`: see lightning_seg.resume. A run stopped by
    SIGTERM exits with status 143 after writing `last.ckpt`."""
    check_task(cfg)
    run = RunDir(cfg.paths.output_dir)
    resume = find_checkpoint(cfg.ckpt_path, run.path, named_by(cfg))
    in_place = resume if resume is not None and resume.in_place else None
    run.path.mkdir(parents=True, exist_ok=True)
    precision_auto = _choose_precision(cfg, in_place, run)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if precision_auto is not None:  # in the checkpoints and the model card
        resolved["precision_auto"] = precision_auto
    # before anything is written: a resume whose config no longer fits the run stops here
    saved_split = prepare_in_place(resume, resolved, run.path) if in_place else None
    # a resumed run draws new random patches instead of replaying those the run started with
    seed_everything(cfg.seed + (resume.global_step if resume else 0), workers=True)
    set_tf32(uses_tf32(cfg.precision))
    module, datamodule = _build_model_and_data(cfg, run, resolved, saved_split)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c]
    loggers = [_logger(c, run.path, in_place) for c in cfg.logger.values() if c]
    trainer = build_trainer(cfg, callbacks=callbacks, logger=loggers)
    datamodule.check_processes(trainer.world_size)  # before the Trainer starts its processes
    env = _record_environment(cfg, run, trainer, datamodule, precision_auto)
    for logger in loggers:
        logger.log_hyperparams({**resolved, "env": env})
    _fit(cfg, run, trainer, module, datamodule, resume, env)
    metrics = _final_metrics(trainer, callbacks, run)
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule}


def _choose_precision(cfg: DictConfig, in_place: Resume | None, run: RunDir) -> dict | None:
    """precision=auto: the study's probe, measured once per node (the local rank 0 process; the others wait),
    or the choice of the run resumed in place. It sets `cfg.precision` and `cfg.inference_precision`."""
    if str(cfg.precision) != AUTO:
        return None
    saved = in_place.run_config.get("precision_auto") if in_place else None
    choose = get_method(cfg.auto_precision.choose)  # the study's probe, named by the config
    chosen = prepare_once_per_node(lambda: choose(cfg, saved), run.path, name="precision-auto")
    cfg.precision, cfg.inference_precision = (chosen[k] for k in ("train", "inference_precision"))
    return chosen


def _build_model_and_data(cfg: DictConfig, run: RunDir, resolved: dict, saved_split: dict | None):
    """The module, then the data module with every case checked (once per node) and the split assigned."""
    # the network first: a patch it cannot take fails in seconds, not after the dataset check
    # run_config given to the constructor, not to instantiate, which would build its _target_ entries too
    module = instantiate(cfg.module, _partial_=True)(run_config=resolved)
    datamodule = instantiate(cfg.data, **({"split": saved_split} if saved_split is not None else {}))
    # every case checked, once per node: a broken dataset fails here, before anything is written
    prepare_once_per_node(datamodule.prepare_data, run.path)
    datamodule.assign_split()  # the datasets are built in each process by Lightning's setup hook
    return module, datamodule


def _record_environment(cfg: DictConfig, run: RunDir, trainer: Trainer, datamodule, precision_auto) -> dict:
    """What the run trains on and with, logged and (global rank 0) written to the run dir with the split."""
    env = environment_info()  # after the Trainer: Lightning sets cudnn.benchmark and determinism there
    env["batch"] = batch_sizes(datamodule.batch_size, trainer)
    env["data"] = datamodule.choose_cache(trainer.num_devices)  # where training reads its cases, and why
    env["known_problems"] = known_problems(env, cfg.precision)
    if precision_auto is not None:
        env["precision_auto"] = precision_auto
    for problem in env["known_problems"]:
        log.warning("%s", problem)
    log.info("environment: %s", env)
    log.info(
        "batch: %(per_device)s patches per process x %(processes)d processes x %(accumulate)d accumulated "
        "= %(global)s patches per optimizer step",
        env["batch"],
    )
    if trainer.is_global_zero:  # one run dir: the other processes of a DDP run write nothing here
        run.diverged_json.unlink(missing_ok=True)  # a resume passes an old divergence or records it anew
        run.write_split(datamodule.state_dict()[SPLIT_KEY])  # the split every checkpoint holds too
        write_json(run.environment_json, env)
    return env


def _fit(cfg: DictConfig, run: RunDir, trainer: Trainer, module, datamodule, resume, env: dict) -> None:
    """`trainer.fit`: a SIGTERM exits 143 with how to continue, a divergence is recorded in the run dir, and
    the environment record gets what the fit decided (compile, fused optimizer, automatic batch)."""
    try:
        with warnings.catch_warnings():
            for message in (LIGHTNING_OWN_DEPRECATION, *(RESUME_WARNINGS if resume is not None else ())):
                warnings.filterwarnings("ignore", message=message)
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume.path) if resume else None)
    except SIGTERMException as stop:  # Lightning stops the loop on SIGTERM with SystemExit(None): status 0
        requeued = "a requeued SLURM job continues it by itself; otherwise " if in_slurm_job() else ""
        log.warning(
            f"stopped by SIGTERM at step {trainer.global_step}; {requeued}continue with: python train.py "
            f"<same overrides> hydra.run.dir={run.path} ckpt_path=last"
        )
        raise SystemExit(128 + signal.SIGTERM) from stop
    except Exception as err:
        if isinstance(err, TrainingDiverged) and trainer.is_global_zero:  # the run dir says so
            where = {"step": trainer.global_step, "epoch": trainer.current_epoch}
            write_json(run.diverged_json, {**where, "precision": str(cfg.precision), "error": str(err)})
        if user_message(err, cfg) is None:  # a bug: its traceback belongs in the log
            log.exception("training failed; run dir: %s", run.path)
        else:  # the entry point prints the message alone
            log.error("training stopped; run dir: %s", run.path)
        raise
    finally:
        env["fast_path"] = module.fast_path
        env["batch"] = batch_sizes(datamodule.batch_size, trainer)
        if trainer.is_global_zero:
            write_json(run.environment_json, env)
        if any(isinstance(logger, WandbLogger) for logger in trainer.loggers):
            import wandb

            wandb.finish()


def _final_metrics(trainer: Trainer, callbacks: list, run: RunDir) -> dict[str, float]:
    """The last logged metrics and the best validation Dice, written to the run dir."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    checkpoint = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
    if checkpoint is not None and checkpoint.best_model_score is not None:
        metrics["best/val_dice"] = float(checkpoint.best_model_score)
        log.info("best val/dice %.4f: %s", metrics["best/val_dice"], checkpoint.best_model_path)
    if trainer.is_global_zero:
        write_json(run.final_metrics_json, metrics)
    return metrics


def batch_sizes(per_device: int | str, trainer: Trainer) -> dict[str, int | str]:
    """Patches per process and step (`auto` until the study's AutoBatch has chosen) and per optimizer step."""
    processes, accumulate = trainer.world_size, trainer.accumulate_grad_batches
    total = per_device * processes * accumulate if isinstance(per_device, int) else per_device
    return {"per_device": per_device, "processes": processes, "accumulate": accumulate, "global": total}


def _logger(config: DictConfig, output_dir: Path, in_place: Resume | None):
    """One configured logger; a resume `in_place` continues the run's metrics.csv and W&B run."""
    if issubclass(get_class(config._target_), WandbLogger):
        run_id = config.get("id") or wandb_run_id(output_dir, in_place is not None)
        return instantiate(config, id=run_id, resume="allow")
    logger = instantiate(config)
    if in_place is not None and isinstance(logger, ResumableCSVLogger):
        logger.continue_before(in_place.global_step)
    return logger


if __name__ == "__main__":
    main()
