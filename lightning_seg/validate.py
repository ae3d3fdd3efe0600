"""`python -m lightning_seg.validate ckpt_path=CKPT [hardware=...] [split=SPLIT_JSON] [data.*=...]`
(console: lightning-seg-validate): Lightning validation of a checkpoint on its run's validation cases,
on one process or many, written to `val_metrics.json` in the run dir."""

import json
import logging
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_seg.checkpoint_format import load_checkpoint
from lightning_seg.config import CONFIG_DIR
from lightning_seg.data.datamodule import split_in_checkpoint
from lightning_seg.distributed import prepare_once_per_node
from lightning_seg.entry import user_errors
from lightning_seg.errors import MissingFileError
from lightning_seg.precision import set_tf32, trainer_precision, uses_tf32
from lightning_seg.run_dir import RunDir, write_json
from lightning_seg.trainers import build_trainer
from lightning_seg.trust import build, named_by

log = logging.getLogger(__name__)
# data settings the checkpoint may not decide (SECURITY.md): how big an image, how far its dataset reaches,
# whether to download; the user's command line may (data.max_image_gib=...)
USER_ONLY = {"max_image_gib": None, "allow_outside_paths": False, "task": {"download": False}}


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="validate")
def main(cfg: DictConfig) -> float:
    with user_errors(cfg):  # a missing checkpoint or data folder: one `error:` line, exit code 2
        return validate(cfg)["val/dice"]


def validate(cfg: DictConfig) -> dict:
    """Validate `cfg.ckpt_path` with the network, preprocessing and data settings of its run."""
    ckpt_path = Path(cfg.ckpt_path)
    if not ckpt_path.is_file():
        raise MissingFileError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    checkpoint, run = load_checkpoint(ckpt_path, named_by(cfg))
    output_dir = Path(cfg.paths.output_dir)
    # unless told: what the run validated in (precision=auto's measured choice), else what it trained in
    precision = str(cfg.precision or run.get("inference_precision") or run["precision"])
    set_tf32(uses_tf32(precision))
    module = build(
        run["module"], checkpoint["state_dict"], ckpt_path, "module", inference_precision=precision
    )
    # the weights alone: validation needs none of the training state a Trainer would restore
    module.load_state_dict(checkpoint["state_dict"])
    if cfg.split is None:  # the run's split: in the checkpoint, else in its run's split.json
        split = split_in_checkpoint(checkpoint) or RunDir.of_checkpoint(ckpt_path).read_split()
    elif Path(cfg.split).is_file():
        split = json.loads(Path(cfg.split).read_text())
    else:
        raise MissingFileError(f"split={Path(cfg.split)}: no such file")
    datamodule = instantiate(OmegaConf.merge(run["data"], USER_ONLY, cfg.data), split=split)
    prepare_once_per_node(datamodule.prepare_data, output_dir)
    validation_only = dict(logger=False, callbacks=[], enable_checkpointing=False, enable_model_summary=False)
    trainer = build_trainer(cfg, precision=trainer_precision(precision), **validation_only)
    datamodule.check_processes(trainer.world_size)  # before the Trainer starts its processes
    (results,) = trainer.validate(module, datamodule=datamodule, verbose=False)
    metrics = {"ckpt_path": str(ckpt_path.resolve()), "cases": len(datamodule.val_cases)}
    metrics |= {"processes": trainer.world_size, "precision": precision}
    metrics |= {key: float(value) for key, value in results.items()}
    if trainer.is_global_zero:
        write_json(output_dir / "val_metrics.json", metrics)
        log.info("val/dice %.4f over %d cases -> %s", metrics["val/dice"], metrics["cases"], output_dir)
    return metrics


if __name__ == "__main__":
    main()
