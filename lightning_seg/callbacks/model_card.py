"""A model card next to the checkpoints, in the spirit of MONAI bundles' metadata.json."""

import json
from pathlib import Path

from pytorch_lightning import Callback, LightningModule, Trainer
from pytorch_lightning.callbacks import ModelCheckpoint

from lightning_seg.environment import environment_info


class ModelCard(Callback):
    """Writes `model_card.json` into the best checkpoint's folder when training ends."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        checkpoint = next((c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)), None)
        if checkpoint is None or not checkpoint.best_model_path or not trainer.is_global_zero:
            return
        config = pl_module.hparams.get("run_config") or {}
        task = config.get("task", {})
        datamodule = trainer.datamodule
        network = config.get("model", {}).get("_target_", "").rsplit(".", 1)[-1]
        cases = {f"{s}_cases": len(getattr(datamodule, f"{s}_cases", [])) for s in ("train", "val", "test")}
        card = {
            "name": f"lightning_seg {task.get('name')} {network}",
            "checkpoint": Path(checkpoint.best_model_path).name,
            "task": {
                k: task.get(k) for k in ("name", "msd_folder", "modality", "in_channels", "labels", "regions")
            },
            "preprocessing": {k: task.get(k) for k in ("orientation", "spacing", "normalization")},
            "patch_size": task.get("patch_size"),
            "network": config.get("model"),
            # the checkpoint's weights: an EMA of the training weights, or the raw weights (null)
            "weight_average": config.get("callbacks", {}).get("weight_average"),
            "precision": config.get("precision"),
            # what validation ran in and prediction runs in unless told (precision=auto: the measured choice)
            "inference_precision": config.get("inference_precision") or config.get("precision"),
            # precision=auto's probe: each precision's timings on the training device, and its choice
            "precision_auto": config.get("precision_auto"),
            "data": {"task_dir": str(getattr(datamodule, "task_dir", "")), **cases},
            "validation": {
                "metric": checkpoint.monitor,
                "best": float(checkpoint.best_model_score),
                "epoch": trainer.current_epoch,
                "global_step": trainer.global_step,
            },
            "seed": config.get("seed"),
            "environment": environment_info(),
            "predict": "python -m lightning_seg.predict ckpt_path=CKPT input=IMAGE_OR_DIR output=DIR",
        }
        path = Path(checkpoint.best_model_path).parent / "model_card.json"
        path.write_text(json.dumps(card, indent=2))
