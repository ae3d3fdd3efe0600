"""`python -m lightning_seg.study.memory task=spleen model=basic_unet precision=16 data.batch_size=2`

Prints the predicted peak GPU memory of one warm training step with its breakdown, the peak of sliding-window
validation and prediction on the task's largest volume; with `plan.gpu=A100-40` or `plan.gpu_memory_gib=40`
the largest batch and cubic patch per precision. Writes plan.json into the run dir (`hydra.run.dir`).
"""

import json
import logging
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lightning_seg.config import CONFIG_DIR
from lightning_seg.entry import user_errors
from lightning_seg.errors import ConfigError
from lightning_seg.study.memory.fit import GPUS, fit_table, markdown_fit
from lightning_seg.study.memory.sliding_window import largest_volume, sliding_window_memory
from lightning_seg.study.memory.step import averages_weights, model_name, train_step_memory
from lightning_seg.task import check_task

log = logging.getLogger(__name__)


def plan(cfg: DictConfig) -> dict:
    """Everything the command prints, as one dict (plan.json)."""
    result = train_step_memory(cfg).as_dict()
    volume, source = (list(cfg.plan.volume), "plan.volume") if cfg.plan.volume else largest_volume(cfg)
    if volume is not None:
        window = sliding_window_memory(cfg, volume, int(cfg.plan.sw_batch_size))
        result["sliding_window"] = {**window, "overlap": cfg.plan.overlap, "volume_source": source}
    else:
        result["sliding_window"] = {"skipped": source}
    card = cfg.plan.gpu_memory_gib  # the card the fit table is for: plan.gpu_memory_gib, else plan.gpu's
    if card is None and cfg.plan.gpu is not None:
        if (gpu := str(cfg.plan.gpu)) not in GPUS:
            raise ConfigError(f"plan.gpu={gpu}: choose one of {', '.join(GPUS)} or set plan.gpu_memory_gib")
        card = GPUS[gpu]
    if card is not None:
        result["fit"] = fit_table(cfg, float(card), cfg.plan.context_gib, cfg.plan.margin, cfg.plan.max_patch)
    return result


def report(result: dict, model: str) -> str:
    patch = "x".join(str(n) for n in result["patch"])
    lines = [
        f"Training step: {model}, patch {patch}, batch {result['batch']}, precision {result['precision']}",
        f"  predicted peak (torch.cuda.max_memory_allocated): {result['peak_gib']:.2f} GiB",
        *(f"    {name:18s} {gib:8.3f} GiB" for name, gib in result["breakdown_gib"].items()),
    ]
    window = result["sliding_window"]
    if "skipped" in window:
        lines.append(f"Sliding window: skipped ({window['skipped']})")
    else:
        lines += [
            f"Sliding window on {'x'.join(map(str, window['volume']))} voxels ({window['volume_source']}), "
            f"{window['sw_batch_size']} windows per pass:",
            f"  validation (stitched and scored on the GPU): {window['validation_peak_gib']:.2f} GiB",
            f"  predict, GPU stitching: {window['predict_gpu_stitching_peak_gib']:.2f} GiB; "
            f"CPU stitching: {window['predict_cpu_stitching_peak_gib']:.2f} GiB",
        ]
    if "fit" in result:
        lines += ["", markdown_fit(result["fit"], model)]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="plan")
def main(cfg: DictConfig) -> None:
    out = Path(HydraConfig.get().runtime.output_dir)
    with user_errors(cfg):
        check_task(cfg)
        result = plan(cfg)
        result["config"] = {
            "task": cfg.task.name,
            "model": OmegaConf.to_container(cfg.model, resolve=True),
            "loss": str(cfg.loss._target_),
            "optimizer": str(cfg.optimizer.optimizer._target_),
            "fused_adam": bool(cfg.speed.fused_adam),
            "weight_average": averages_weights(cfg),
        }
        (out / "plan.json").write_text(json.dumps(result, indent=2))
    print(report(result, model_name(cfg)))
    print(f"written to {out / 'plan.json'}")
    log.info("predicted training-step peak %d bytes", result["peak_bytes"])


if __name__ == "__main__":
    main()
