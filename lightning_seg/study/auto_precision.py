"""`precision=auto`: the fastest safe precision for this run on this device, measured before training:
warm steps of the run's own training step (in a Trainer built like training's, on synthetic batches) and
one sliding-window batch of the inference forward, timed in each precision the device runs natively."""

import logging
import statistics
import tempfile
import time
from contextlib import ExitStack
from itertools import pairwise

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
    """Why `choice` is not worth timing here: bf16 on a CPU whose oneDNN has no bf16 kernels (one small
    convolution measures its ratio to fp32: 10-40x)."""
    cpu_bf16 = device.type == "cpu" and autocast_dtype(choice, device) == torch.bfloat16
    if not cpu_bf16 or precision.cpu_has_native_bf16():
        return None
    return (
        f"not timed: no native bf16 on this CPU ({torch.backends.cpu.get_cpu_capability()}), "
        f"a bf16 Conv3d takes {precision.bf16_conv_slowdown():.1f}x as long as in fp32"
    )


def fastest(seconds: dict[str, float | None], order: list[str], margin: float) -> str:
    """The choice of `order` with the fewest seconds (None: not timed or unsafe), where a later (less
    precise) one must beat the best earlier one by more than `margin`; fp32 when none was timed."""
    best = None
    for choice in order:
        s = seconds.get(choice)
        if s is not None and (best is None or s < seconds[best] * (1 - margin)):
            best = choice
    return best or "32"


def enough_timed(seconds: list[float], least: int, budget_s: float) -> bool:
    """At least `least` timings taking `budget_s` in all (short ones: more of them, for a steadier
    median), or any number taking three times that (long ones: one is enough, their spread is small)."""
    return (len(seconds) >= least and sum(seconds) >= budget_s) or sum(seconds) >= 3 * budget_s


class StepClock(Callback):
    """Step times and losses; stops the fit once the steps after the warm-up are `enough_timed`, or once
    a step took longer than `limit_s`."""

    def __init__(self, warmup: int, steps: int, min_timed_s: float, limit_s: float | None) -> None:
        # the first step is always warm-up: its time alone holds the one-off work (allocation, kernel choice)
        self.warmup, self.steps, self.min_timed_s, self.limit_s = max(1, warmup), steps, min_timed_s, limit_s
        self.marks, self.losses, self.too_slow = [], [], False  # marks: the first start, then batch ends

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.marks:
            self.marks.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.marks.append(time.perf_counter())
        self.losses.append(float(outputs["loss"]))
        last = self.marks[-1] - self.marks[-2]
        if len(self.marks) == 2 and last > LONG_STEP_S:
            self.warmup = 1
        if self.limit_s is not None and last > self.limit_s:
            self.too_slow = trainer.should_stop = True
        if enough_timed(self.intervals(), self.steps, self.min_timed_s):
            trainer.should_stop = True

    def intervals(self) -> list[float]:
        """Seconds of each timed step, batch end to batch end."""
        return [b - a for a, b in pairwise(self.marks)][self.warmup :]


def time_training(
    cfg: DictConfig, choice: str, device: torch.device, batch_size: int, limit_s: float | None
) -> dict:
    """Median seconds per training step in `choice` (batch start to batch start), or why there is none."""
    probe, run = cfg.auto_precision, cfg.copy()
    with open_dict(run):  # eagerly: a compiled network's speed-up is timed by the benchmark
        run.precision, run.module.compile = choice, False
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
        torch.cuda.empty_cache()  # a no-op where CUDA was never initialised
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
    x = torch.randn((cfg.module.sw_batch_size, cfg.task.in_channels, *cfg.task.patch_size), device=device)
    times, finite = [], True
    # as the training steps, with half their time budget (a forward alone varies less than a step); a
    # first forward over LONG_STEP_S counts (its one-off share is small, a second one would double the cost)
    least, budget_s = cfg.auto_precision.steps, cfg.auto_precision.min_timed_s / 2

    def timed() -> list[float]:
        return times[1:] if times and times[0] < LONG_STEP_S else times

    try:
        with autocast(choice, device):
            while len(timed()) < MAX_TIMED_STEPS and not enough_timed(timed(), least, budget_s):
                start = time.perf_counter()
                out = net(x)
                finite &= bool(torch.isfinite(out).all())  # waits for the GPU too
                times.append(time.perf_counter() - start)
    except torch.OutOfMemoryError:
        return {"error": "out of memory"}
    if not finite:
        return {"error": "non-finite output"}
    return {"batch_s": statistics.median(timed()), "batches": len(timed())}


def probe(cfg: DictConfig, device: torch.device) -> dict:
    """Time every candidate on `device`; the record of what was measured and chosen (JSON-able)."""
    started = time.perf_counter()
    order = candidates(device)
    batch = cfg.data.batch_size if isinstance(cfg.data.batch_size, int) else 2  # `auto`: its smallest
    training, inference = {}, {}
    with ExitStack() as quiet:  # the Trainers' start-up banners (GPU available, ...): one per precision
        for logger in map(logging.getLogger, ("pytorch_lightning", "lightning_fabric")):
            quiet.callback(logger.setLevel, logger.level)
            logger.setLevel(logging.WARNING)
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
        "train": fastest({c: r.get("step_s") for c, r in training.items()}, order, margin),
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
    # the device training will run on (the first GPU of a multi-GPU run)
    gpu = str(cfg.trainer.get("accelerator", "auto")) in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    record = probe(cfg, torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu"))
    for line in describe(record):
        log.info("%s", line)
    return record
