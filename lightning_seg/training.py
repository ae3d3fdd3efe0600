"""The training task: compose-time config in, trained model and metrics out."""

import json
import logging
import signal
import warnings
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning import Trainer, seed_everything
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lightning_seg.config import CONFIG_DIR
from lightning_seg.distributed import prepare_once_per_node
from lightning_seg.entry import user_errors, user_message
from lightning_seg.environment import environment_info
from lightning_seg.errors import ConfigError
from lightning_seg.loggers import ResumableCSVLogger
from lightning_seg.plan import largest_batch, predict_step
from lightning_seg.precision import set_tf32, uses_tf32
from lightning_seg.resume import Resume, find_checkpoint, prepare_in_place, wandb_run_id, write_atomic

log = logging.getLogger(__name__)

# Lightning warnings a resume expects, filtered only around a resumed fit
RESUME_WARNINGS = (
    # in place: the run's own checkpoints are there
    r"Checkpoint directory .* exists and is not empty",
    # a last.ckpt from the middle of an epoch: the rest of that epoch draws its random patches from a
    # fresh shuffle, which is what every epoch does anyway
    r"You're resuming from a checkpoint that ended before the epoch ended",
)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """`python train.py ...` in a checkout, `lightning-seg-train ...` anywhere."""
    with user_errors(cfg):  # a broken dataset, config or path: one `error:` line, exit code 2
        metrics, _ = train(cfg)
    return metrics.get("best/val_dice")  # what a Hydra sweeper optimizes


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit the configured module on the configured task; return final metrics and the objects.

    `ckpt_path=last` continues the run in `paths.output_dir` (see lightning_seg.resume); a checkpoint
    from another dir starts a new run from it. A run stopped by SIGTERM exits with status 143 after
    writing `last.ckpt`."""
    output_dir = Path(cfg.paths.output_dir)
    auto_batch = choose_batch(cfg) if str(cfg.data.batch_size) == "auto" else None
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resume = find_checkpoint(cfg.ckpt_path, output_dir)
    in_place = resume is not None and resume.in_place
    # before anything is written: a resume whose config no longer fits the run stops here
    saved_split = prepare_in_place(resume, resolved, output_dir) if in_place else None
    # a resumed run draws new random patches instead of replaying those the run started with
    seed_everything(cfg.seed + (resume.global_step if resume else 0), workers=True)
    set_tf32(uses_tf32(cfg.precision))
    output_dir.mkdir(parents=True, exist_ok=True)

    # the network first: a patch it cannot take fails in seconds, not after the dataset check
    module = instantiate(cfg.module)
    datamodule = instantiate(cfg.data, **({"split": saved_split} if saved_split is not None else {}))
    # every case checked, once per node: a broken dataset fails here, before anything is written
    prepare_once_per_node(datamodule.prepare_data, output_dir)
    datamodule.assign_split()  # the datasets are built in each process by Lightning's setup hook
    # set afterwards: passed to instantiate, its _target_ entries would be instantiated too
    module.hparams["run_config"] = resolved
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c]
    loggers = [_logger(c, output_dir, resume) for c in cfg.logger.values() if c]
    trainer: Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)

    datamodule.check_processes(trainer.world_size)  # before the Trainer starts its processes
    if auto_batch is not None:
        cap_batch(cfg, auto_batch, datamodule, trainer.world_size, resolved)
    env = environment_info()  # after the Trainer: Lightning sets cudnn.benchmark and determinism there
    env["batch"] = batch_sizes(datamodule.batch_size, trainer)
    if auto_batch is not None:
        env["batch"]["auto"] = auto_batch
    log.info("environment: %s", env)
    log.info(
        "batch: %(per_device)d patches per process x %(processes)d processes x %(accumulate)d accumulated "
        "= %(global)d patches per optimizer step",
        env["batch"],
    )
    if trainer.is_global_zero:  # one run dir: the other processes of a DDP run write nothing here
        split = {"train": datamodule.train_cases, "val": datamodule.val_cases, "test": datamodule.test_cases}
        write_atomic(output_dir / "split.json", json.dumps(split, indent=1))
        (output_dir / "environment.json").write_text(json.dumps(env, indent=2))
    for logger in loggers:
        logger.log_hyperparams({**resolved, "env": env})
        if isinstance(logger, WandbLogger):
            # W&B plots validation curves against training time, not steps
            logger.experiment.define_metric("time/train_s")
            logger.experiment.define_metric("val/*", step_metric="time/train_s")
    try:
        with warnings.catch_warnings():
            # Lightning 2.6's own _pytree uses torch's deprecated LeafSpec: nothing a user can act on
            warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
            if resume is not None:
                for message in RESUME_WARNINGS:
                    warnings.filterwarnings("ignore", message=message)
            trainer.fit(module, datamodule=datamodule, ckpt_path=str(resume.path) if resume else None)
    except SIGTERMException as stop:  # Lightning stops the loop on SIGTERM with SystemExit(None): status 0
        log.warning(
            "stopped by SIGTERM at step %d; continue with: python train.py <same overrides> "
            "hydra.run.dir=%s ckpt_path=last",
            trainer.global_step,
            output_dir,
        )
        raise SystemExit(128 + signal.SIGTERM) from stop
    except Exception as err:
        if user_message(err, cfg) is None:  # a bug: its traceback belongs in the log
            log.exception("training failed; run dir: %s", output_dir)
        else:  # the entry point prints the message alone
            log.error("training stopped; run dir: %s", output_dir)
        raise
    finally:
        # what compile and the fused optimizer became on this machine is known once fit has started
        env["fast_path"] = module.fast_path
        if auto_batch is not None:  # every GPU run with an automatic batch checks the memory planner
            measured = trainer.callback_metrics.get("memory/train_peak_gib")
            auto_batch["measured_train_peak_gib"] = float(measured) if measured is not None else None
        if trainer.is_global_zero:
            (output_dir / "environment.json").write_text(json.dumps(env, indent=2))
        if any(isinstance(logger, WandbLogger) for logger in loggers):
            import wandb

            wandb.finish()

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    checkpoint = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
    if checkpoint is not None and checkpoint.best_model_score is not None:
        metrics["best/val_dice"] = float(checkpoint.best_model_score)
        log.info("best val/dice %.4f: %s", metrics["best/val_dice"], checkpoint.best_model_path)
    if trainer.is_global_zero:
        (output_dir / "final_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule}


def choose_batch(cfg: DictConfig) -> dict:
    """`data.batch_size=auto`: the largest batch whose predicted training-step peak fits in this GPU's
    free memory (lightning_seg.plan), written into `cfg`; returns the choice and its prediction."""

    if not torch.cuda.is_available():
        raise ConfigError(
            "data.batch_size=auto sizes the batch to a CUDA GPU's free memory and there is no GPU here: "
            "give a number (python -m lightning_seg.plan plan.gpu=<card> predicts what fits)"
        )
    free, total = torch.cuda.mem_get_info()
    cfg.data.batch_size = int(cfg.data.samples_per_volume)  # a number for the planner's config
    batch, predicted = largest_batch(cfg, free)
    if batch == 0:
        raise ConfigError(
            f"data.batch_size=auto: not even batch {cfg.data.samples_per_volume} fits in the "
            f"{free / 2**30:.1f} GiB free on this GPU (predicted {predicted / 2**30:.1f} GiB): "
            "lower task.patch_size or use precision=16"
        )
    cfg.data.batch_size = batch
    log.info(
        "data.batch_size=auto: %d (predicted step peak %.2f GiB of %.2f GiB free, %.1f GiB card)",
        batch,
        predicted / 2**30,
        free / 2**30,
        total / 2**30,
    )
    return {"chosen": batch, "predicted_peak_gib": predicted / 2**30, "free_gib": free / 2**30}


def cap_batch(cfg: DictConfig, auto_batch: dict, datamodule, world_size: int, resolved: dict) -> None:
    """An automatic batch draws at most every training case of a process once per step (a larger
    one would leave the loader without a full batch)."""
    cases = max(1, len(datamodule.train_cases) // world_size)
    cap = cases * datamodule.samples_per_volume
    if datamodule.batch_size > cap:
        log.info("data.batch_size=auto: capped at %d (%d training cases per process)", cap, cases)
        datamodule.batch_size = resolved["data"]["batch_size"] = auto_batch["capped_by_cases"] = cap
        auto_batch["predicted_peak_gib"] = predict_step(cfg, batch=cap).peak_bytes / 2**30


def batch_sizes(per_device: int, trainer: Trainer) -> dict[str, int]:
    """`data.batch_size` counts patches per process and step; what an optimizer step sees in all."""
    accumulate = trainer.accumulate_grad_batches
    return {
        "per_device": per_device,
        "processes": trainer.world_size,
        "accumulate": accumulate,
        "global": per_device * trainer.world_size * accumulate,
    }


def _logger(config: DictConfig, output_dir: Path, resume: Resume | None):
    """One configured logger; a resume in place continues the run's metrics.csv and W&B run."""
    in_place = resume is not None and resume.in_place
    target = get_class(config._target_)
    if issubclass(target, WandbLogger):
        run_id = config.get("id") or wandb_run_id(output_dir, in_place)
        return instantiate(config, id=run_id, resume="allow")
    logger = instantiate(config)
    if in_place and isinstance(logger, ResumableCSVLogger):
        logger.continue_before(resume.global_step)
    return logger


if __name__ == "__main__":
    main()
