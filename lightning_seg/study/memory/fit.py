"""What fits on a card: the largest batch and the largest cubic patch per precision, under the card's memory
less what PyTorch's allocator cannot use, less a margin. `largest_batch` (`data.batch_size=auto`) takes the
free memory `torch.cuda.mem_get_info()` reports, the context spent already, and applies the margin only."""

from bisect import bisect_left
from functools import cache

from omegaconf import DictConfig

from lightning_seg.errors import UserError
from lightning_seg.precision import PRECISIONS
from lightning_seg.study.memory.step import GIB, train_step_memory

# nominal memory (GiB) of the cards a user can name with plan.gpu=
GPUS = {
    "V100-16": 16, "T4": 16, "A10": 24, "L4": 24, "RTX4090": 24, "A100-40": 40, "A100-80": 80,
    "H100": 80, "H100-NVL": 94, "H200": 141,
}  # fmt: skip
# the CUDA context, cuBLAS and cuDNN handles and kernels: outside the allocator (0.3-0.6 GiB on recent cards)
CONTEXT_GIB = 0.5
# the allocator reserves whole segments (2 MiB-rounded or 20 MiB for requests over 1 MiB): a few percent over
# the allocated peak; a card reports 1-2% under its nominal size in `GPUS` (an A100-80 shows 79.2 GiB); the
# predictor is within a few percent of the measured peaks (docs/benchmarks/memory_plan.md)
MARGIN = 0.10
PATCH_STEP = 16  # cubic patch edges tried: multiples of 16 (basic_unet's rule; the others accept all)


def card_budget(capacity_gib: float, context_gib: float = CONTEXT_GIB, margin: float = MARGIN) -> int:
    """Bytes a predicted peak may reach on a card of `capacity_gib` nominal memory."""
    return int((capacity_gib - context_gib) * (1 - margin) * GIB)


def largest_batch(
    cfg: DictConfig, free_bytes: int, margin: float = MARGIN, precision=None, patch=None
) -> tuple[int, int]:
    """The largest `data.batch_size` (a multiple of `data.samples_per_volume`) whose predicted warm-step peak
    fits in `free_bytes` less `margin`, and that peak; (0, the peak at the smallest batch) when none fits."""
    budget = int(free_bytes * (1 - margin))
    step = int(cfg.data.get("samples_per_volume", 1) or 1)

    @cache
    def peak(batch: int) -> int:
        return train_step_memory(cfg, batch=batch, patch=patch, precision=precision).peak_bytes

    low, per_step = peak(step), max(peak(2 * step) - peak(step), 1)
    batch = max(0, (budget - low) // per_step + 1) * step  # the linear model's answer, in whole steps
    while batch > 0 and peak(batch) > budget:
        batch -= step
    while peak(batch + step) <= budget:
        batch += step
    return (batch, peak(batch)) if batch else (0, low)


def largest_patch(cfg: DictConfig, budget: int, precision=None, max_edge: int = 512) -> tuple[int, int]:
    """The largest cubic patch edge (a multiple of 16) whose predicted peak fits in `budget` bytes at the
    configured batch, and that peak; (0, the peak at the smallest edge the network accepts) when none fits."""
    edges = list(range(PATCH_STEP, max_edge + 1, PATCH_STEP))

    @cache
    def peak(edge: int) -> int | None:
        try:
            return train_step_memory(cfg, patch=[edge] * 3, precision=precision).peak_bytes
        except (UserError, ValueError):  # a patch the network cannot take (basic_unet at 16^3)
            return None

    # the smallest edge the network accepts; above it peak memory grows with the edge: bisect (~6 runs)
    first, lowest = next(((i, p) for i, p in enumerate(map(peak, edges)) if p is not None), (None, 0))
    if first is None or lowest > budget:
        return 0, lowest
    over = bisect_left(edges, True, first + 1, key=lambda edge: peak(edge) is None or peak(edge) > budget)
    return edges[over - 1], peak(edges[over - 1])


def fit_table(
    cfg: DictConfig, capacity_gib: float, context_gib=CONTEXT_GIB, margin=MARGIN, max_edge: int = 512
) -> dict:
    """Per precision on a card of `capacity_gib`: the largest batch at the task's patch and cubic patch (up
    to `max_edge`) at the configured batch. TF32 shares fp32's memory, fp16 bf16's (plus a few scalars)."""
    budget = card_budget(capacity_gib, context_gib, margin)
    free = int(budget / (1 - margin))  # largest_batch applies the margin itself
    rows, by_memory = [], {}
    for precision in PRECISIONS:
        key = {"tf32": "32", "bf16": "16"}.get(precision, precision)
        if key not in by_memory:
            batch, batch_bytes = largest_batch(cfg, free, margin, precision=key)
            edge, edge_bytes = largest_patch(cfg, budget, precision=key, max_edge=max_edge)
            by_memory[key] = {
                "largest_batch": batch,
                "largest_batch_peak_gib": round(batch_bytes / GIB, 3),
                "largest_cubic_patch": edge,
                "largest_cubic_patch_peak_gib": round(edge_bytes / GIB, 3),
            }
        rows.append({"precision": precision, **by_memory[key]})
    return {
        "capacity_gib": capacity_gib,
        "budget_gib": round(budget / GIB, 3),
        "context_gib": context_gib,
        "margin": margin,
        "patch": [int(n) for n in cfg.task.patch_size],
        "batch": int(cfg.data.batch_size),
        "rows": rows,
    }


def markdown_fit(table: dict, model: str) -> str:
    patch = "x".join(str(n) for n in table["patch"])
    lines = [
        f"{model}, {table['capacity_gib']:g} GiB card (budget {table['budget_gib']:.1f} GiB): "
        f"largest batch at {patch}, largest cubic patch at batch {table['batch']}",
        "",
        "| precision | largest batch | its peak GiB | largest cubic patch | its peak GiB |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in table["rows"]:
        patch_cell = f"{r['largest_cubic_patch']}^3" if r["largest_cubic_patch"] else "none fits"
        lines.append(
            f"| {r['precision']} | {r['largest_batch'] or 'none fits'} | {r['largest_batch_peak_gib']:.2f} "
            f"| {patch_cell} | {r['largest_cubic_patch_peak_gib']:.2f} |"
        )
    return "\n".join(lines)
