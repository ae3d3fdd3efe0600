"""`python -m lightning_seg.study.bench [bench=cpu_smoke] [overrides]`: the reference talk's step table.

Warm-up plus N timed training steps, phase by phase, at every grid point (precision x model x patch x
batch) into bench.json, bench.md and charts in the run dir; a failing point (out of memory included) is
recorded and the grid goes on. `bench=loader`: the step fed by the task's real loader, against synthetic,
and the patches per second one loader worker draws from the store: how many workers the step needs."""

import itertools
import json
import logging
from pathlib import Path

import hydra
import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_seg.config import CONFIG_DIR
from lightning_seg.entry import user_errors
from lightning_seg.environment import environment_info
from lightning_seg.precision import label
from lightning_seg.study import auto_precision
from lightning_seg.study.bench import bare_loop
from lightning_seg.study.bench.step import measure
from lightning_seg.study.bench.tables import markdown_table, plot_memory, plot_phases
from lightning_seg.study.bench.worker_rate import patches_per_worker_s, workers_needed
from lightning_seg.task import check_task

log = logging.getLogger(__name__)


def grid(cfg: DictConfig) -> list[tuple[str, str, int | None, int]]:
    precisions = list(cfg.bench.precisions) or [cfg.precision]
    models = list(cfg.bench.models) or [HydraConfig.get().runtime.choices["model"]]
    points = [(None, cfg.data.batch_size)] if cfg.bench.loader else cfg.bench.points  # None: task's patch
    return [
        (str(p), m, None if edge is None else int(edge), int(batch))
        for p, m, (edge, batch) in itertools.product(precisions, models, points)
    ]


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


def side_by_side(runs: dict, device) -> dict:
    """A-B-B-A rounds of two measurements (whichever runs first pays for warming kernels and allocator):
    per phase the mean of the rounds' medians, with the first round's other fields; or a failed round."""
    results = {name: [] for name in runs}
    for name in [*runs, *reversed(runs)]:
        results[name].append(attempt(name, runs[name], device))
    for name, rounds in results.items():
        medians = [r["median_s"] for r in rounds if "median_s" in r]
        if len(medians) < len(rounds):
            results[name] = next(r for r in rounds if "median_s" not in r)
        else:
            mean = {k: sum(m[k] for m in medians) / len(medians) for k in medians[0]}
            results[name] = {**rounds[0], "median_s": mean, "rounds_median_s": medians}
    return results


def run_point(
    base: list[str], precision: str, model: str, edge: int | None, batch: int, device, bare: bool, datamodule
) -> dict:
    """One grid point (`base` overrides plus its own), beside the real loader or (`bare`) the bare loop."""
    overrides = [*base, f"precision={precision}", f"model={model}"]
    if edge is not None:
        overrides.append(f"task.patch_size=[{edge},{edge},{edge}]")
    cfg = compose(config_name="bench", overrides=overrides)
    patch = edge if edge is not None else "x".join(str(e) for e in cfg.task.patch_size)
    record = {"precision": precision, "model": model, "patch": patch, "batch": batch}
    slow = None if cfg.bench.slow_fallbacks else auto_precision.untimed_reason(precision, device)
    if slow:  # minutes per point for a number known in advance: 10-40x fp32
        log.info("%s %s: %s (bench.slow_fallbacks=true times it)", model, label(precision), slow)
        return {**record, "project": {"error": slow}}
    runs = {"project": lambda: measure(cfg, batch, device)}
    if datamodule is not None:
        runs["loader"] = lambda: measure(cfg, batch, device, datamodule.train_dataloader())
    elif bare:
        runs["bare"] = lambda: bare_loop.run(cfg, batch, device)
    if len(runs) == 1:
        record["project"] = attempt("project", runs["project"], device)
    else:
        record.update(side_by_side(runs, device))
    ours, theirs, loader = record["project"], record.get("bare", {}), record.get("loader", {})
    if "median_s" in ours and "median_s" in theirs:
        record["project_over_bare"] = ours["median_s"]["total"] / theirs["median_s"]["total"]
    if "median_s" in ours and "median_s" in loader:
        record["loader_over_synthetic_rate"] = loader["samples_per_s"] / ours["samples_per_s"]
    if datamodule is not None and "median_s" in ours:  # the step's consumption, and who can feed it
        worker = patches_per_worker_s(datamodule.train_set, cfg.bench.worker_seconds)
        needed = workers_needed(ours["samples_per_s"], worker["patches_per_s"])
        record["feeding"] = {
            "worker": worker,
            "consumed_patches_per_s": ours["samples_per_s"],
            "workers_needed": needed,
            "num_workers": cfg.data.num_workers,
            "cache": datamodule.choose_cache()["cache"],
        }
    log.info("%s", json.dumps(record))
    return record


def probe_against_grid(base: list[str], records: list[dict], device, margin: float) -> list[dict]:
    """precision=auto's probe at each (model, patch, batch) of the grid, beside its rule's pick from it."""
    rows = []
    for model, patch, batch in dict.fromkeys((r["model"], r["patch"], r["batch"]) for r in records):
        overrides = [*base, f"model={model}", f"data.batch_size={batch}", "precision=32"]
        if isinstance(patch, int):
            overrides.append(f"task.patch_size=[{patch},{patch},{patch}]")
        cfg = compose(config_name="bench", overrides=overrides)
        probe = attempt("probe", lambda cfg=cfg: auto_precision.probe(cfg, device), device)
        intervals = {  # what the probe times too: the step with Lightning's work between steps
            r["precision"]: r["project"]["step_interval_s"]
            for r in records
            if (r["model"], r["patch"], r["batch"]) == (model, patch, batch) and "median_s" in r["project"]
        }
        order = auto_precision.candidates(device)
        choice = auto_precision.fastest(intervals, order, margin) if intervals else None
        rows.append({"model": model, "patch": patch, "batch": batch, "probe": probe, "grid_choice": choice})
    return rows


def prepared_datamodule(cfg: DictConfig):
    """The task's real training data, checked and preprocessed once for every point."""
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="bench")
def main(cfg: DictConfig) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(HydraConfig.get().runtime.output_dir)
    with user_errors(cfg):
        check_task(cfg)
        datamodule = prepared_datamodule(cfg) if cfg.bench.loader else None
    base = list(HydraConfig.get().overrides.task)
    records = [run_point(base, *point, device, cfg.bench.bare_loop, datamodule) for point in grid(cfg)]
    probes = probe_against_grid(base, records, device, cfg.auto_precision.margin) if cfg.bench.probe else []
    result = {
        "environment": environment_info(),  # after the points: the flags their Trainers set
        "bench": OmegaConf.to_container(cfg.bench, resolve=True),
        "speed": {**OmegaConf.to_container(cfg.speed, resolve=True), "reproducible": cfg.reproducible},
        "trainer": {"benchmark": cfg.trainer.benchmark, "deterministic": cfg.trainer.deterministic},
        "points": records,
        "precision_auto": {"margin": cfg.auto_precision.margin, "points": probes},
    }
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    (out / "bench.md").write_text(markdown_table(result))
    plot_phases(result, out / "phases.png")
    plot_memory(result, out / "memory.png")
    print((out / "bench.md").read_text())
    print(f"written to {out}")


if __name__ == "__main__":
    main()
