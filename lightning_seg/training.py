"""The training task: compose-time config in, trained model and metrics out."""

import json
import logging
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning import Trainer, seed_everything
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import WandbLogger

from lightning_seg.environment import environment_info
from lightning_seg.precision import set_tf32, uses_tf32

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    """Fit the configured module on the configured task; return final metrics and the objects."""
    seed_everything(cfg.seed, workers=True)
    set_tf32(uses_tf32(cfg.precision))
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()  # every case checked: a broken dataset fails here, before anything is written
    datamodule.setup("fit")
    split = {"train": datamodule.train_cases, "val": datamodule.val_cases, "test": datamodule.test_cases}
    (output_dir / "split.json").write_text(json.dumps(split, indent=1))
    module = instantiate(cfg.module)
    # set afterwards: passed to instantiate, its _target_ entries would be instantiated too
    module.hparams["run_config"] = resolved
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c]
    loggers = [instantiate(c) for c in cfg.logger.values() if c]
    trainer: Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)

    env = environment_info()  # after the Trainer: Lightning sets cudnn.benchmark and determinism there
    log.info("environment: %s", env)
    (output_dir / "environment.json").write_text(json.dumps(env, indent=2))
    for logger in loggers:
        logger.log_hyperparams({**resolved, "env": env})
        if isinstance(logger, WandbLogger):
            # W&B plots validation curves against training time, not steps
            logger.experiment.define_metric("time/train_s")
            logger.experiment.define_metric("val/*", step_metric="time/train_s")
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
    except Exception:
        log.exception("training failed; run dir: %s", output_dir)
        raise
    finally:
        # what compile and the fused optimizer became on this machine is known once fit has started
        env["fast_path"] = module.fast_path
        (output_dir / "environment.json").write_text(json.dumps(env, indent=2))
        if any(isinstance(logger, WandbLogger) for logger in loggers):
            import wandb

            wandb.finish()

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    checkpoint = next((c for c in callbacks if isinstance(c, ModelCheckpoint)), None)
    if checkpoint is not None and checkpoint.best_model_score is not None:
        metrics["best/val_dice"] = float(checkpoint.best_model_score)
        log.info("best val/dice %.4f: %s", metrics["best/val_dice"], checkpoint.best_model_path)
    (output_dir / "final_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics, {"trainer": trainer, "module": module, "datamodule": datamodule}
