"""`precision=auto`: the fastest safe precision for this run on this device, measured before training.

For each precision the device runs natively, warm steps of the run's own training step (its
network, patch, batch, loss, optimizer and weight average, in a Lightning Trainer built like
training's, on synthetic batches) are timed, and separately one sliding-window batch of the
validation/prediction forward. Training takes the fastest step whose loss stayed finite, validation
and prediction the fastest inference batch. A less precise choice (fp32 > TF32 > bf16 > fp16) wins
only when it is `margin` faster than the best more precise one: bf16 is preferred over fp16 within a
few percent, fp16 trains only with Lightning's grad scaler. bf16 on a CPU without native bf16 kernels
is not timed: one small convolution measures its ratio to fp32 (10-40x) in a fraction of a second.
"""

import logging
import statistics
import tempfile
import time
from contextlib import contextmanager

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from pytorch_lightning import Callback, seed_everything

from lightning_seg import precision  # its CPU checks by module: tests fake a CPU without native bf16
from lightning_seg.errors import ConfigError
from lightning_seg.model.module import grad_scaler
from lightning_seg.precision import autocast, autocast_dtype, label, set_tf32, uses_tf32
from lightning_seg.study.step_trainer import fit_steps, step_trainer, synthetic_batches

log = logging.getLogger(__name__)

MAX_TIMED_STEPS = 50  # short steps are timed until auto_precision.min_timed_s, at most this many
LONG_STEP_S = 1.0  # a first step this long has warmed the kernels up: one warm-up step is enough


def candidates(device: torch.device) -> list[str]:
    """The precisions `device` can train in, most precise first (fp16 AMP is bf16 on a CPU: not twice)."""
    if device.type != "cuda":
        return ["32", "bf16"]
    return ["32", "tf32", *(["bf16"] if torch.cuda.is_bf16_supported() else []), "16"]


def untimed_reason(choice: str, device: torch.device) -> str | None:
    """Why `choice` is not worth timing here: bf16 on a CPU whose oneDNN has no bf16 kernels."""
    if (
        device.type == "cpu"
        and autocast_dtype(choice, device) == torch.bfloat16
        and not precision.cpu_has_native_bf16()
    ):
        return (
            f"not timed: no native bf16 on this CPU ({torch.backends.cpu.get_cpu_capability()}), "
            f"a bf16 Conv3d takes {precision.bf16_conv_slowdown():.1f}x as long as in fp32"
        )
    return None


def fastest(seconds: dict[str, float | None], order: list[str], margin: float) -> str:
    """The choice of `order` with the fewest seconds (None: not timed or unsafe), where a later (less
    precise) one must beat the best earlier one by more than `margin`; fp32 when none was timed."""
    best = None
    for choice in order:
        s = seconds.get(choice)
        if s is not None and (best is None or s < seconds[best] * (1 - margin)):
            best = choice
    return best or "32"


class StepClock(Callback):
    """Batch end times and losses. Stops the fit once enough steps after the warm-up are timed: at
    least `steps` taking `min_timed_s` in all (short steps: more of them, for a steadier median), or
    any that took three times that (long steps: one is enough, their spread is small); or once a step
    took longer than `limit_s`. A first step over a second is warm-up enough."""

    def __init__(self, warmup: int, steps: int, min_timed_s: float, limit_s: float | None) -> None:
        # the first step is always warm-up: its time alone holds the one-off work (allocation, kernel choice)
        self.warmup, self.steps, self.min_timed_s, self.limit_s = max(1, warmup), steps, min_timed_s, limit_s
        self.started, self.ends, self.losses = 0.0, [], []
        self.too_slow = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.ends:
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.ends.append(time.perf_counter())
        self.losses.append(float(outputs["loss"]))
        if len(self.ends) == 1 and self.ends[0] - self.started > LONG_STEP_S:
            self.warmup = 1
        last = self.ends[-1] - (self.ends[-2] if len(self.ends) > 1 else self.started)
        if self.limit_s is not None and last > self.limit_s:
            self.too_slow = trainer.should_stop = True
        timed = self.intervals()
        if (len(timed) >= self.steps and sum(timed) >= self.min_timed_s) or sum(
            timed
        ) >= 3 * self.min_timed_s:
            trainer.should_stop = True

    def intervals(self) -> list[float]:
        """Seconds of each timed step, batch end to batch end."""
        return [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)][self.warmup - 1 :]


def with_precision(cfg: DictConfig, choice: str) -> DictConfig:
    """`cfg` training in `choice`, eagerly (a compiled network's speed-up is timed by the benchmark)."""
    run = cfg.copy()
    with open_dict(run):
        run.precision = choice
        run.module.compile = False
    return run


def time_training(
    cfg: DictConfig, choice: str, device: torch.device, batch_size: int, limit_s: float | None
) -> dict:
    """Median seconds per training step in `choice` (batch start to batch start), or why there is none."""
    probe = cfg.auto_precision
    run = with_precision(cfg, choice)
    set_tf32(uses_tf32(choice))
    seed_everything(cfg.seed, workers=True, verbose=False)
    module = instantiate(run.module)
    clock = StepClock(probe.warmup_steps, probe.steps, probe.min_timed_s, limit_s)
    average = cfg.callbacks.get("weight_average")  # training updates its weight average after every step
    steps = probe.warmup_steps + max(probe.steps, MAX_TIMED_STEPS)  # the clock stops it sooner
    try:
        with tempfile.TemporaryDirectory(prefix="auto-precision-") as root:
            trainer = step_trainer(run, steps, [clock, *([instantiate(average)] if average else [])], root)
            fit_steps(trainer, module, synthetic_batches(run, batch_size, device, steps))
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if not all(torch.isfinite(torch.tensor(clock.losses))):
        return {"error": f"non-finite loss ({clock.losses[-1]})"}
    if clock.too_slow:
        return {"error": f"a step took over {limit_s:.3g} s (the fastest so far, twice)"}
    if choice == "16" and grad_scaler(trainer) is None:
        return {"error": "fp16 without a grad scaler"}
    intervals = clock.intervals()
    return {"step_s": statistics.median(intervals), "steps": len(intervals), "loss": clock.losses[-1]}


@torch.no_grad()
def time_inference(cfg: DictConfig, choice: str, device: torch.device) -> dict:
    """Median seconds of one sliding-window batch (sw_batch_size patches) through the network in `choice`."""
    set_tf32(uses_tf32(choice))
    seed_everything(cfg.seed, verbose=False)
    net = instantiate(cfg.model).to(device).eval()
    shape = (cfg.module.sw_batch_size, cfg.task.in_channels, *cfg.task.patch_size)
    x = torch.randn(shape, device=device)
    times, finite = [], True
    # as the training steps, with half their time budget (a forward alone varies less than a step); a
    # first forward over LONG_STEP_S counts (its one-off share is small, a second one would double the cost)
    least, budget_s = cfg.auto_precision.steps, cfg.auto_precision.min_timed_s / 2

    def timed() -> list[float]:
        return times[1:] if times and times[0] < LONG_STEP_S else times

    def enough() -> bool:
        done = (len(timed()) >= least and sum(timed()) >= budget_s) or sum(timed()) >= 3 * budget_s
        return done or len(timed()) >= MAX_TIMED_STEPS

    try:
        with autocast(choice, device):
            while not enough():
                start = time.perf_counter()
                out = net(x)
                finite &= bool(torch.isfinite(out).all())  # waits for the GPU too
                times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    if not finite:
        return {"error": "non-finite output"}
    return {"batch_s": statistics.median(timed()), "batches": len(timed())}


@contextmanager
def quiet_trainers():
    """The probe's Trainers without their start-up banners (GPU available, ...): one per precision."""
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning_fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def probe(cfg: DictConfig, device: torch.device) -> dict:
    """Time every candidate on `device`; the record of what was measured and chosen (JSON-able)."""
    started = time.perf_counter()
    order = candidates(device)
    batch = cfg.data.batch_size if isinstance(cfg.data.batch_size, int) else 2  # `auto`: its smallest
    training, inference = {}, {}
    with quiet_trainers():
        for choice in order:
            reason = untimed_reason(choice, device)
            if reason:
                training[choice] = inference[choice] = {"error": reason}
                continue
            steps = [r["step_s"] for r in training.values() if "step_s" in r]
            training[choice] = time_training(cfg, choice, device, batch, 2 * min(steps) if steps else None)
            inference[choice] = time_inference(cfg, choice, device)
    set_tf32(False)
    margin = cfg.auto_precision.margin
    train = fastest({c: r.get("step_s") for c, r in training.items()}, order, margin)
    # TF32 is a switch of the whole run, not of one context: inference keeps the training's setting
    infer_order = [c for c in order if c != "tf32"]
    infer = fastest({c: inference[c].get("batch_s") for c in infer_order}, infer_order, margin)
    return {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.backends.cpu.get_cpu_capability()})",
        "batch": batch,
        "patch": list(cfg.task.patch_size),
        "training": training,
        "inference": inference,
        "train": train,
        "inference_precision": infer,
        "probe_s": time.perf_counter() - started,
    }


def describe(record: dict) -> list[str]:
    """The probe's table as log lines: one per precision, then the choice."""
    lines = [f"precision=auto on {record['device']}, batch {record['batch']} of {record['patch']}:"]
    for choice, step in record["training"].items():
        infer = record["inference"][choice]
        if "error" in step:
            lines.append(f"  {label(choice):9s} {step['error']}")
            continue
        infer_s = f"{infer['batch_s']:.4f} s" if "batch_s" in infer else infer["error"]
        lines.append(f"  {label(choice):9s} training step {step['step_s']:.4f} s, inference batch {infer_s}")
    lines.append(
        f"  -> training in {label(record['train'])}, validation and prediction in "
        f"{label(record['inference_precision'])} (probe {record['probe_s']:.1f} s)"
    )
    return lines


def choose(cfg: DictConfig, saved: dict | None = None) -> dict:
    """The record `precision=auto` trains by: `saved` (a resumed run's choice, kept rather than measured
    again), else a probe on the device training will use, its table logged."""
    if cfg.trainer.num_nodes > 1:
        raise ConfigError(
            "precision=auto measures one node's device; with trainer.num_nodes > 1 name the precision "
            "(a one-node run with precision=auto logs its choice)"
        )
    if saved is not None:
        log.info("precision=auto: the resumed run's choice, %s", label(saved["train"]))
        return saved
    record = probe(cfg, probe_device(cfg))
    for line in describe(record):
        log.info("%s", line)
    return record


def probe_device(cfg: DictConfig) -> torch.device:
    """The device training will run on (the first GPU of a multi-GPU run)."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
