"""What fits on a card: the largest batch and the largest cubic patch per precision.

The budget a prediction must stay under is the card's memory less what PyTorch's allocator cannot
use, with a margin:

- `context_gib` (0.5): the CUDA context, cuBLAS and cuDNN handles and kernels live outside the
  caching allocator (0.3-0.6 GiB on recent cards) and are not in `max_memory_allocated`;
- `margin` (10%): the allocator reserves whole segments (requests over 1 MiB come from 2 MiB-rounded
  or 20 MiB segments), so reserved memory runs a few percent over the allocated peak before an
  out-of-memory error; the card sizes in `GPUS` are the nominal ones, and a card reports 1-2% less
  (an A100-80 shows 79.2 GiB); and the predictor itself is within a few percent of the measured peaks
  (docs/benchmarks/memory_plan.md).

`largest_batch(cfg, free_bytes)` is the entry for `data.batch_size=auto`: it takes the free memory
`torch.cuda.mem_get_info()` reports (the context is spent already) and applies the margin only.
"""

from omegaconf import DictConfig

from lightning_seg.errors import UserError
from lightning_seg.precision import PRECISIONS
from lightning_seg.study.memory.step import GIB, train_step_memory

# nominal memory (GiB) of the cards a user can name with plan.gpu=
GPUS = {
    "V100-16": 16, "T4": 16, "A10": 24, "L4": 24, "RTX4090": 24, "A100-40": 40, "A100-80": 80,
    "H100": 80, "H100-NVL": 94, "H200": 141,
}  # fmt: skip
CONTEXT_GIB = 0.5
MARGIN = 0.10
PATCH_STEP = 16  # cubic patch edges tried: multiples of 16 (basic_unet's rule; the others accept all)


def card_budget(capacity_gib: float, context_gib: float = CONTEXT_GIB, margin: float = MARGIN) -> int:
    """Bytes a predicted peak may reach on a card of `capacity_gib` nominal memory."""
    return int((capacity_gib - context_gib) * (1 - margin) * GIB)


def largest_batch(
    cfg: DictConfig, free_bytes: int, margin: float = MARGIN, precision=None, patch=None
) -> tuple[int, int]:
    """The largest `data.batch_size` (a multiple of `data.samples_per_volume`) whose predicted warm-step
    peak fits in `free_bytes` less `margin`, and that prediction in bytes; (0, prediction at the
    smallest batch) when none fits.

    Activation memory is linear in the batch, so two predictions place the answer; it is then checked
    with fake-tensor runs on both sides (the chosen batch fits, one step more does not)."""
    budget = int(free_bytes * (1 - margin))
    step = int(cfg.data.get("samples_per_volume", 1) or 1)

    memo: dict[int, int] = {}

    def peak(batch: int) -> int:
        if batch not in memo:
            memo[batch] = train_step_memory(cfg, batch=batch, patch=patch, precision=precision).peak_bytes
        return memo[batch]

    low, per_step = peak(step), max(peak(2 * step) - peak(step), 1)
    batch = max(0, (budget - low) // per_step + 1) * step  # the linear model's answer, in whole steps
    while batch > 0 and peak(batch) > budget:
        batch -= step
    while peak(batch + step) <= budget:
        batch += step
    return (batch, peak(batch)) if batch else (0, low)


def largest_patch(
    cfg: DictConfig, budget: int, batch: int | None = None, precision=None, max_edge: int = 512
) -> tuple[int, int]:
    """The largest cubic patch edge (a multiple of 16) whose predicted peak fits in `budget` bytes at
    the configured (or given) batch, and that prediction; (0, prediction at the smallest edge the
    network accepts) when none fits. Peak memory grows with the patch, so a bisection over the edges
    needs about six predictions."""
    edges = list(range(PATCH_STEP, max_edge + 1, PATCH_STEP))

    def peak(edge: int) -> int | None:
        try:
            return train_step_memory(cfg, batch=batch, patch=[edge] * 3, precision=precision).peak_bytes
        except (UserError, ValueError):  # a patch the network cannot take (basic_unet at 16^3)
            return None

    # the smallest edge the network accepts; above it peak memory grows with the edge: bisect
    first = next(((i, p) for i, p in ((i, peak(e)) for i, e in enumerate(edges)) if p is not None), None)
    if first is None:
        return 0, 0
    lo, hi = first[0] + 1, len(edges) - 1
    best = (edges[first[0]], first[1]) if first[1] <= budget else (0, first[1])
    if not best[0]:
        return best
    while lo <= hi:
        mid = (lo + hi) // 2
        predicted = peak(edges[mid])
        if predicted is not None and predicted <= budget:
            best, lo = (edges[mid], predicted), mid + 1
        else:
            hi = mid - 1
    return best


def fit_table(
    cfg: DictConfig, capacity_gib: float, context_gib=CONTEXT_GIB, margin=MARGIN, max_edge: int = 512
) -> dict:
    """For each precision: the largest batch at the task's patch and the largest cubic patch (up to
    `max_edge`) at the configured batch on a card of `capacity_gib`. TF32 changes the arithmetic, not
    the memory, so it shares fp32's row; bf16 and fp16 tensors have the same sizes (fp16's grad scaler
    adds a few scalars), so they share one."""
    budget = card_budget(capacity_gib, context_gib, margin)
    free = int(budget / (1 - margin))  # largest_batch applies the margin itself
    rows, by_memory = [], {}
    for precision in PRECISIONS:
        key = {"tf32": "32", "bf16": "16"}.get(precision, precision)
        if key not in by_memory:
            batch, batch_bytes = largest_batch(cfg, free, margin, precision=key)
            edge, edge_bytes = largest_patch(cfg, budget, precision=key, max_edge=max_edge)
            by_memory[key] = (batch, batch_bytes, edge, edge_bytes)
        batch, batch_bytes, edge, edge_bytes = by_memory[key]
        rows.append(
            {
                "precision": precision,
                "largest_batch": batch,
                "largest_batch_peak_gib": round(batch_bytes / GIB, 3),
                "largest_cubic_patch": edge,
                "largest_cubic_patch_peak_gib": round(edge_bytes / GIB, 3),
            }
        )
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
