"""Peak GPU memory of one warm training step, predicted on the CPU with fake tensors: the module's own step
as training instantiates it, run twice so that the measured second step starts with Adam's state and the
first step's gradients alive, as a warm step on a GPU does."""

import copy
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from lightning_seg.precision import autocast_dtype, trainer_precision
from lightning_seg.study.memory.allocator import AllocatorModel
from lightning_seg.study.memory.cuda_autocast import CudaAutocast

GIB = 2**30
CUDA = torch.device("cuda")  # the device predicted for (only its type is read; no GPU is needed)
# cuDNN's workspaces come from the caching allocator but not from any tensor a fake step can see: a
# fixed allowance. 0.5 GiB is what the MONAI UNet reference points (1.4 / 1.1 GiB measured) sit above
# the fake-tensor peak in both fp32 and fp16; for the large networks it is hidden under activations.
CUDNN_WORKSPACE_GIB = 0.5
# breakdown categories, in print order; the allocator model's kinds map onto them
CATEGORIES = ("weights", "averaged_weights", "gradients", "optimizer", "input", "activations",
              "amp_weight_copies", "transient", "cudnn_workspace")  # fmt: skip
KIND_TO_CATEGORY = {"forward": "activations", "loss": "activations", "backward": "transient",
                    "step": "transient", "setup": "transient"}  # fmt: skip


@dataclass
class StepMemory:
    """Predicted peak of a warm training step and what is alive at that moment (bytes)."""

    model: str
    precision: str
    batch: int
    patch: list[int]
    peak_bytes: int
    breakdown: dict[str, int] = field(default_factory=dict)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    def as_dict(self) -> dict:
        return {
            **{name: getattr(self, name) for name in ("model", "precision", "batch", "patch")},
            "peak_gib": round(self.peak_gib, 4),
            "peak_bytes": self.peak_bytes,
            "breakdown_gib": {k: round(v / GIB, 4) for k, v in self.breakdown.items()},
        }


def model_name(cfg: DictConfig) -> str:
    return str(cfg.model._target_).rsplit(".", 1)[-1]


class ShapeDiceLoss(nn.Module):
    """MONAI's `DiceLoss` / `DiceCELoss` forward minus its value reads (`torch.arange(...).tolist()`, which
    fake tensors lack): every tensor MONAI makes (softmax, one-hot target, the norms' inputs, their
    difference, cross-entropy's log-softmax) is made here too."""

    def __init__(self, loss_cfg: DictConfig) -> None:
        super().__init__()
        self.softmax = bool(loss_cfg.get("softmax", False))
        self.to_onehot_y = bool(loss_cfg.get("to_onehot_y", False))
        self.squared_pred = bool(loss_cfg.get("squared_pred", False))
        self.include_background = bool(loss_cfg.get("include_background", True))
        self.cross_entropy = str(loss_cfg.get("_target_", "")).endswith("DiceCELoss")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # as DiceCELoss: the Dice's own tensors are gone (but what backward keeps) before cross-entropy runs
        loss = self._dice(logits, target)
        if self.cross_entropy:
            loss = loss + F.cross_entropy(logits, target.squeeze(1).long())
        return loss

    def _dice(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        pred = torch.softmax(logits, 1) if self.softmax else logits
        if self.to_onehot_y:  # monai.networks.utils.one_hot
            target = torch.zeros(pred.shape, dtype=target.dtype).scatter_(1, target.long(), 1)
        if not self.include_background:
            pred, target = pred[:, 1:], target[:, 1:]
        dims = list(range(2, pred.ndim))
        if self.squared_pred:  # monai.losses.utils.compute_tp_fp_fn, ord=2
            pred_o = torch.linalg.vector_norm(pred, 2, dims).pow(2)
            ground_o = torch.linalg.vector_norm(target, 2, dims).pow(2)
            difference = torch.linalg.vector_norm(pred - target, 2, dims).pow(2)
            tp = (pred_o + ground_o - difference) / 2
            fp, fn = pred_o - tp, ground_o - tp
        else:
            tp = torch.sum(pred * target, dims)
            fp, fn = torch.sum(pred, dims) - tp, torch.sum(target, dims) - tp
        return (1 - (2 * tp + 1e-5) / (2 * tp + fp + fn + 1e-5)).mean()


def averages_weights(cfg: DictConfig) -> bool:
    """Whether Lightning's WeightAveraging (`callbacks.weight_average`) holds a copy of the weights."""
    return OmegaConf.select(cfg, "callbacks.weight_average") is not None


def workspace_allowance(cfg: DictConfig) -> int:
    """The cuDNN workspace allowance in bytes (`plan.cudnn_workspace_gib`, else the default)."""
    return int(OmegaConf.select(cfg, "plan.cudnn_workspace_gib", default=CUDNN_WORKSPACE_GIB) * GIB)


def train_step_memory(
    cfg: DictConfig,
    batch: int | None = None,
    patch=None,
    precision=None,
    loop: str = "lightning",
    workspace_bytes: int | None = None,
    fake: bool = True,
) -> StepMemory:
    """Predict `torch.cuda.max_memory_allocated` of a warm training step at the config's (or the given)
    batch, patch and precision (a 160^3 batch-8 step: about a second). `loop="bare"`: the benchmark's bare
    PyTorch loop (`study.bench.bare_loop`: two input sets, `zero_grad` first, the logits held through
    backward, no weight average). `workspace_bytes`: the cuDNN allowance (0: the allocations alone).
    `fake=False`: real CPU tensors and the module's own loss (slow: the tests' check of the fake run)."""
    cfg = copy.deepcopy(cfg)  # the task's patch feeds the network
    if batch is not None:
        OmegaConf.update(cfg, "data.batch_size", int(batch))
    if patch is not None:
        OmegaConf.update(cfg, "task.patch_size", [int(n) for n in patch])
    if precision is not None:
        OmegaConf.update(cfg, "precision", precision)
    batch, patch = int(cfg.data.batch_size), [int(n) for n in cfg.task.patch_size]
    dtype = autocast_dtype(cfg.precision, CUDA)
    bare = loop == "bare"
    clip = None if bare else OmegaConf.select(cfg, "trainer.gradient_clip_val")
    with FakeTensorMode() if fake else nullcontext():
        module = instantiate(cfg.module).train()
        if fake:
            module.loss = ShapeDiceLoss(cfg.loss)
        optimizer = module.build_optimizer(CUDA, clip, trainer_precision(cfg.precision))
        weights = [*module.net.parameters(), *module.net.buffers()]
        with AllocatorModel() as mem:
            mem.track(weights, "weights")
            # alive for the whole step (its update after each step works in place)
            averaged = [torch.empty_like(t) for t in weights] if averages_weights(cfg) and not bare else []
            mem.track(averaged, "averaged_weights")
            image, label = (batch, int(cfg.task.in_channels), *patch), (batch, 1, *patch)
            # the loader's labels are float32 (EnsureTyped); the bare loop has two input sets on the device
            sets = 2 if bare else 1
            inputs = [{"image": torch.randn(image), "label": torch.zeros(label)} for _ in range(sets)]
            mem.track(inputs, "input")
            _train_step(module, optimizer, inputs[0], dtype, clip, mem, bare)
            mem.reset_peak()  # the warm step: Adam's state exists
            _train_step(module, optimizer, inputs[-1], dtype, clip, mem, bare)
    breakdown = dict.fromkeys(CATEGORIES, 0)
    for block in mem.peak_blocks:
        breakdown[KIND_TO_CATEGORY.get(block.kind, block.kind)] += block.nbytes
    workspace = workspace_allowance(cfg) if workspace_bytes is None else workspace_bytes
    breakdown["cudnn_workspace"] = workspace
    return StepMemory(model_name(cfg), str(cfg.precision), batch, patch, mem.peak + workspace, breakdown)


def _train_step(module, optimizer, batch: dict, dtype, clip, mem: AllocatorModel, bare: bool) -> None:
    """Lightning's automatic optimization of `module.step_loss`, or the bare loop. The loss runs under the
    forward's CUDA autocast, which casts nothing of fp32 logits, as `compute_loss`'s autocast-off region."""
    if bare:
        optimizer.zero_grad(set_to_none=True)
    mem.phase = "forward"
    on_weight_cast = partial(mem.track, kind="amp_weight_copies")
    with CudaAutocast(dtype, on_weight_cast) if dtype is not None else nullcontext():
        if bare:
            logits = module(batch["image"])
            mem.phase = "loss"
            loss = module.compute_loss(logits, batch["label"])
        else:
            loss = module.step_loss(batch)
    if not bare:
        optimizer.zero_grad(set_to_none=True)  # Lightning's order: the closure's step, then zero_grad
    mem.phase = "backward"
    if dtype == torch.float16:
        loss = loss * 65536.0  # GradScaler.scale; its unscale and step work in place on the grads
    loss.backward()
    del loss
    params = [p for p in module.net.parameters() if p.grad is not None]
    mem.track([p.grad for p in params], "gradients")
    mem.phase = "step"
    if clip:  # Lightning's gradient_clip_val: clip_grad_norm_ over every parameter, CUDA's foreach kernels
        torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
    optimizer.step()
    mem.track([v for state in optimizer.state.values() for v in state.values()], "optimizer")
