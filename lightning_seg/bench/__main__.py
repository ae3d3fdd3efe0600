"""`python -m lightning_seg.bench [bench=cpu_smoke] [overrides]`: the reference talk's step table.

For every grid point (precision x model x patch x batch) it times warm-up plus N steps of the
project's training step, phase by phase, and writes bench.json, bench.md and PNG charts into
the run dir. An out-of-memory point is recorded as such and the grid goes on.
"""

import importlib.util
import itertools
import json
import logging
import sys
from pathlib import Path

import hydra
import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lightning_seg.bench.step import measure
from lightning_seg.bench.tables import markdown_table, plot_memory, plot_phases
from lightning_seg.config import CONFIG_DIR
from lightning_seg.environment import environment_info

log = logging.getLogger(__name__)
ANCHOR_MODELS = {"basic_unet": "basicunet", "monai_unet": "monai_unet", "dynunet": "dynunet"}
ANCHOR_MODES = {"32": "fp32", "tf32": "tf32", "16": "fp16", "bf16": "bf16"}


def grid(cfg: DictConfig) -> list[tuple[str, str, int, int]]:
    precisions = list(cfg.bench.precisions) or [cfg.precision]
    models = list(cfg.bench.models) or [HydraConfig.get().runtime.choices["model"]]
    return [
        (str(p), m, int(edge), int(batch))
        for p, m, (edge, batch) in itertools.product(precisions, models, cfg.bench.points)
    ]


def load_anchor(path: str):
    """Import ../shared/bench/anchor_step.py, which reads an output path from argv at import."""
    spec = importlib.util.spec_from_file_location("anchor_step", path)
    anchor = importlib.util.module_from_spec(spec)
    argv, sys.argv = sys.argv, [path, "/dev/null"]
    try:
        spec.loader.exec_module(anchor)
    finally:
        sys.argv = argv
    return anchor


def attempt(name: str, fn, device) -> dict:
    """Run one measurement; an error (out of memory included) becomes the record."""
    try:
        return fn()
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    except Exception as err:  # a failing point must not end the grid
        log.exception("%s failed", name)
        return {"error": f"{type(err).__name__}: {err}"[:300]}
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def mean_of_rounds(rounds: list[dict]) -> dict:
    """Per-phase mean of the rounds' medians (the first round keeps its other fields)."""
    if any("median_s" not in r for r in rounds):
        return next(r for r in rounds if "median_s" not in r)
    phases = rounds[0]["median_s"]
    return {
        **rounds[0],
        "median_s": {k: sum(r["median_s"][k] for r in rounds) / len(rounds) for k in phases},
        "rounds_median_s": [r["median_s"] for r in rounds],
    }


def run_point(cfg: DictConfig, precision: str, model: str, edge: int, batch: int, device, anchor) -> dict:
    record = {"precision": precision, "model": model, "patch": edge, "batch": batch}
    overrides = [
        *HydraConfig.get().overrides.task,
        f"precision={precision}",
        f"model={model}",
        f"task.patch_size=[{edge},{edge},{edge}]",
    ]
    point_cfg = compose(config_name="bench", overrides=overrides)
    bench = cfg.bench
    runs = {
        "project": lambda: measure(point_cfg, batch, device),
        "anchor": lambda: anchor.run(
            ANCHOR_MODELS[model],
            edge,
            batch,
            ANCHOR_MODES[precision],
            bench.channels_last_3d,
            bench.steps,
            bench.warmup,
        ),
    }
    if anchor is None:
        record["project"] = attempt("project", runs["project"], device)
    else:
        # A-B-B-A: whichever runs first at a point pays for warming kernels and allocator
        results = {name: [] for name in runs}
        for name in ("project", "anchor", "anchor", "project"):
            results[name].append(attempt(name, runs[name], device))
        record.update({name: mean_of_rounds(rounds) for name, rounds in results.items()})
        ours, theirs = record["project"], record["anchor"]
        if "median_s" in ours and "median_s" in theirs:
            record["project_over_anchor"] = ours["median_s"]["total"] / theirs["median_s"]["total"]
    log.info("%s", json.dumps(record))
    return record


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="bench")
def main(cfg: DictConfig) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(HydraConfig.get().runtime.output_dir)
    anchor = load_anchor(cfg.bench.anchor_script) if cfg.bench.anchor_script else None
    records = [run_point(cfg, *point, device, anchor) for point in grid(cfg)]
    env = environment_info()
    env["cudnn_benchmark"] = bool(cfg.bench.cudnn_benchmark)
    result = {"environment": env, "bench": OmegaConf.to_container(cfg.bench, resolve=True), "points": records}
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    (out / "bench.md").write_text(markdown_table(result))
    plot_phases(result, out / "phases.png")
    plot_memory(result, out / "memory.png")
    print((out / "bench.md").read_text())
    print(f"written to {out}")


if __name__ == "__main__":
    main()
