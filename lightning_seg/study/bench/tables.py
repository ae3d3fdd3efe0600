"""The benchmark's Markdown table (laid out like the reference talk's) and its charts."""

from contextlib import contextmanager
from operator import itemgetter

from matplotlib.figure import Figure  # not pyplot: no backend to choose, no figure to close

from lightning_seg.precision import label
from lightning_seg.study.callbacks.step_breakdown import PHASES

_point = itemgetter("model", "patch", "batch")


def _ok(points: list[dict]) -> list[dict]:
    return [p for p in points if "median_s" in p.get("project", {})]


def patch_label(point: dict) -> str:
    """`128^3` for a cube (grid points), `40x56x40` for a task's own patch (loader mode)."""
    return f"{point['patch']}^3" if isinstance(point["patch"], int) else str(point["patch"])


def _device(env: dict) -> str:
    return env["gpu"] or f"CPU ({env['cpu_count']} cores, {env['torch_threads']} threads)"


def markdown_table(result: dict) -> str:
    env, points = result["environment"], result["points"]
    lines = [
        f"# Training-step breakdown on {_device(env)}",
        "",
        f"torch {env['torch']}, cuDNN {env['cudnn']}, cudnn.benchmark={env['cudnn_benchmark']}, "
        f"TF32 switches set per precision (fp32 = TF32 off). Median of {result['bench']['steps']} steps "
        f"after {result['bench']['warmup']} warm-up steps; seconds per step. Peak memory: "
        + ("`torch.cuda.max_memory_allocated`." if env["gpu"] else "process peak RSS (grows across points)."),
        "",
        f"| model | patch, batch | method | total | {' | '.join(PHASES)} | peak GiB "
        "| TFLOP/s | x vs fp32 | x vs TF32 | bare loop total | ours / bare |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in points:
        head = f"| {p['model']} | {patch_label(p)}, {p['batch']} | {label(p['precision'])} |"
        ours = p.get("project", {})
        if "median_s" not in ours:
            lines.append(f"{head} {ours.get('error', 'not run')} |" + " |" * 13)
            continue
        m = ours["median_s"]
        cells = [f"{m[k]:.4f}" for k in ("total", *PHASES)]
        cells += [f"{ours['peak_memory_gib']:.2f}", f"{ours['tflop_per_s']:.2f}"]
        for ref in ("32", "tf32"):  # x vs fp32, x vs TF32
            base = [q for q in _ok(points) if q["precision"] == ref and _point(q) == _point(p)]
            cells.append(f"{base[0]['project']['median_s']['total'] / m['total']:.2f}" if base else "-")
        loop = p.get("bare", {})
        cells.append(f"{loop['median_s']['total']:.4f}" if "median_s" in loop else loop.get("error", "-"))
        cells.append(f"{p['project_over_bare']:.3f}" if "project_over_bare" in p else "-")
        lines.append(f"{head} {' | '.join(cells)} |")
    if any("loader" in p for p in points):
        lines += ["", *loader_table(points)]
    if result.get("precision_auto", {}).get("points"):
        lines += ["", *probe_table(result)]
    return "\n".join(lines) + "\n"


def loader_table(points: list[dict]) -> list[str]:
    lines = [
        "## Real loader against synthetic input",
        "",
        "Samples per second from batch start to batch start (loader, step and Lightning together); "
        "data wait: share of that time spent inside the loader's `next()`.",
        "",
        "| model | patch, batch | method | synthetic samples/s | loader samples/s | loader / synthetic "
        "| data wait (loader) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for p in points:
        ours, loader = p.get("project", {}), p.get("loader", {})
        head = f"| {p['model']} | {patch_label(p)}, {p['batch']} | {label(p['precision'])} |"
        if "median_s" not in ours or "median_s" not in loader:
            lines.append(f"{head} {ours.get('error', loader.get('error', 'not run'))} |" + " |" * 3)
            continue
        lines.append(
            f"{head} {ours['samples_per_s']:.2f} | {loader['samples_per_s']:.2f} | "
            f"{p['loader_over_synthetic_rate']:.3f} | {100 * loader['data_wait_frac']:.1f}% |"
        )
    feeding = [p for p in points if "feeding" in p]
    if feeding:
        lines += [
            "",
            "Who feeds the step: patches per second one loader worker (one thread) draws from the "
            "preprocessed store with the run's recipe, the synthetic step's consumption, the workers that "
            "keeps busy.",
            "",
            "| model | patch, batch | method | cases read from | patches/s per worker | step consumes "
            "patches/s | workers needed | data.num_workers |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for p in feeding:
            f = p["feeding"]
            lines.append(
                f"| {p['model']} | {patch_label(p)}, {p['batch']} | {label(p['precision'])} | {f['cache']} | "
                f"{f['worker']['patches_per_s']:.2f} | {f['consumed_patches_per_s']:.2f} | "
                f"{f['workers_needed']} | {f['num_workers']} |"
            )
    return lines


def _timings(records: dict, key: str) -> str:
    return ", ".join(f"{label(c)} {r[key]:.4f}" if key in r else f"{label(c)} -" for c, r in records.items())


def probe_table(result: dict) -> list[str]:
    """precision=auto's probe beside the grid: its timings per precision, its choice, the grid's."""
    lines = [
        "## precision=auto's probe against this grid",
        "",
        "The probe: warm training steps (batch end to batch end: Lightning's work between steps counts) and "
        "one sliding-window batch per precision, medians. The grid's choice: the same rule (the fastest; a "
        f"less precise one only {result['precision_auto']['margin']:.0%} faster) over the grid's step "
        "intervals (batch start to batch start).",
        "",
        "| model | patch, batch | probe: training step s | probe: inference batch s | probe s "
        "| probe trains in | grid's fastest | agree | probe validates in |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    rows = result["precision_auto"]["points"]
    for row in rows:
        head = f"| {row['model']} | {patch_label(row)}, {row['batch']} |"
        probe = row["probe"]
        if "error" in probe:
            lines.append(f"{head} {probe['error']} |" + " |" * 6)
            continue
        grid, train, infer = row["grid_choice"], probe["train"], probe["inference_precision"]
        agree = ("yes" if grid == train else "no") if grid else "-"
        unsafe = probe["training"].get(grid, {}).get("error", "") if grid != train else ""
        agree += f" (probe: {unsafe})" if "non-finite" in unsafe else ""
        grid = label(grid) if grid else "-"
        lines.append(
            f"{head} {_timings(probe['training'], 'step_s')} | {_timings(probe['inference'], 'batch_s')} "
            f"| {probe['probe_s']:.1f} | {label(train)} | {grid} | {agree} | {label(infer)} |"
        )
    untimed = {r["error"] for row in rows for r in row["probe"].get("training", {}).values() if "error" in r}
    return [*lines, *(f"- {reason}" for reason in sorted(untimed)), ""]


@contextmanager
def _chart(result: dict, path, ylabel: str, title: str):
    """A bar chart of the measured points: yields them, their bar labels and the axes, then saves."""
    points = _ok(result["points"])
    labels = [f"{p['model']}\n{patch_label(p)} b{p['batch']}\n{label(p['precision'])}" for p in points]
    ax = Figure(figsize=(max(6, 1.1 * len(points)), 4.5), dpi=120).subplots()
    yield points, labels, ax
    ax.set_ylabel(ylabel)
    ax.set_title(f"{title} on {_device(result['environment'])}", fontsize=10)
    ax.tick_params(axis="x", labelsize=7)
    ax.figure.savefig(path, bbox_inches="tight")


def plot_phases(result: dict, path) -> None:
    with _chart(result, path, "seconds per training step (median)", "Training step by phase") as chart:
        points, labels, ax = chart
        bottom = [0.0] * len(points)
        for phase in PHASES:
            values = [p["project"]["median_s"][phase] for p in points]
            ax.bar(labels, values, bottom=bottom, label=phase)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.legend(fontsize=8)


def plot_memory(result: dict, path) -> None:
    with _chart(result, path, "peak memory (GiB)", "Peak memory per point") as (points, labels, ax):
        ax.bar(labels, [p["project"]["peak_memory_gib"] for p in points], color="tab:gray")
