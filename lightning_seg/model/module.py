"""LightningModule: a 3D segmentation network, soft Dice loss, sliding-window validation."""

import inspect
import logging
import shutil
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from pytorch_lightning import LightningModule, Trainer
from torch import nn
from torchmetrics.segmentation import DiceScore

from lightning_seg.checkpoint_format import stamp, upgrade
from lightning_seg.model.cpu_bf16 import fp32_where_bf16_conv_fails
from lightning_seg.model.deep_supervision import segmentation_loss
from lightning_seg.precision import autocast, choice_of, fast_inference_precision
from lightning_seg.scoring import Regions, scored_structures, structure_masks

log = logging.getLogger(__name__)


def grad_scaler(trainer: Trainer | None) -> torch.amp.GradScaler | None:
    """Lightning's enabled grad scaler: only fp16 AMP on a GPU has one (`16-mixed` on a CPU runs bf16)."""
    scaler = getattr(getattr(trainer, "precision_plugin", None), "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def loss_scale(scaler: torch.amp.GradScaler) -> torch.Tensor | float:
    """A copy of the device scale (no GPU wait; `update()` changes it in place), or the initial float.
    The public `get_scale()` waits for the GPU at every step; `_get_scale_async` has no public twin."""
    scale = scaler._get_scale_async()
    return scaler.get_scale() if scale is None else scale.detach().clone()


def compile_unavailable_reason(device: torch.device) -> str | None:
    """Why torch.compile cannot run here, checked up front so that an unusable compiler means eager."""
    # torch has no public twin of these: Dynamo's Python and platform check, and Triton's (installed, and a
    # GPU it supports: a spec lookup would pass an older card that then fails at the first step)
    import torch._dynamo
    from torch.utils._triton import has_triton

    if not torch._dynamo.is_dynamo_supported():
        return "TorchDynamo does not support this Python or platform"
    if device.type == "cuda":
        return None if has_triton() else "Triton is missing (pip install triton) or does not support this GPU"
    compilers = (shutil.which(cxx) for cxx in ("c++", "g++", "clang++"))
    return None if any(compilers) else "no C++ compiler found for Inductor's CPU kernels"


def whole_volume_logits(
    net: nn.Module,
    image: torch.Tensor,
    patch_size: Sequence[int],
    overlap: float,
    sw_batch_size: int,
    **placement,
) -> torch.Tensor:
    """Gaussian-weighted sliding windows of the training patch over whole volumes: the one inference of
    validation, `predict` and `evaluate` (`placement`: MONAI's `device`, `sw_device`), so that the same
    overlap gives `evaluate` the Dice `val/dice` reported."""
    return sliding_window_inference(
        image, patch_size, sw_batch_size, net, overlap=overlap, mode="gaussian", **placement
    )


class SegmentationModule(LightningModule):
    """Train on random patches, validate on whole volumes: `train/loss`, `val/dice` (mean over the scored
    structures: foreground labels or the task's `regions`, as `evaluate` scores them), `val/dice_<structure>`.
    `step_loss` is the training step's one definition: the study's benchmark and memory planner run it too."""

    # read by callbacks and the study; set in __init__ only
    net: nn.Module  # StepBreakdown hooks its forward
    labels: list[str]  # background first: ValidationImages' legend
    fast_path: dict[str, Any]  # what the fast-path switches became here: environment.json
    amp_step_skipped: torch.Tensor | bool | None  # fp16 AMP: the scaler skipped the last step (AmpGuard)
    inference_precision: str | None  # the `precision=` choice of validation and prediction (`setup`)

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module,
        optimizer: Callable[..., torch.optim.Optimizer],
        labels: Sequence[str],
        patch_size: Sequence[int],
        scheduler: Callable[..., Any] | None = None,
        sw_batch_size: int = 4,
        sw_overlap: float = 0.25,
        run_config: dict | None = None,
        compile: bool = False,
        compile_backend: str = "inductor",
        channels_last_3d: bool = False,
        fused_adam: bool = True,
        scheduler_interval: str = "epoch",
        regions: Regions | None = None,
        inference_precision: str | None = None,
    ) -> None:
        super().__init__()
        # plain data, for torch.load(weights_only=True); run_config (the Hydra config) rebuilds the rest
        self.save_hyperparameters(ignore=["net", "loss", "optimizer", "scheduler"], logger=False)
        self.net, self.loss = fp32_where_bf16_conv_fails(net), loss
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.labels = list(labels)
        self.structures = scored_structures(self.labels, regions)
        self.val_dice = DiceScore(
            num_classes=len(self.structures), include_background=True, average="none", input_format="one-hot"
        )
        self.memory_format = torch.channels_last_3d if channels_last_3d else torch.contiguous_format
        self.fast_path: dict[str, Any] = {"compiled": False, "channels_last_3d": channels_last_3d}
        self.amp_step_skipped = self.inference_precision = None

    def configure_model(self) -> None:
        """Memory layout and torch.compile, once (Lightning calls this on every fit and validate)."""
        if self.memory_format is torch.channels_last_3d:
            self.net.to(memory_format=self.memory_format)
        if not self.hparams.compile or self.fast_path["compiled"]:
            return
        if reason := compile_unavailable_reason(self.trainer.strategy.root_device):
            log.warning("speed.compile=true, but %s: the network runs eagerly", reason)
            self.fast_path["compile_fallback"] = reason
            return
        # in place: the state dict keeps its keys (no `_orig_mod.`), so checkpoints load anywhere
        self.net.compile(backend=self.hparams.compile_backend)
        self.fast_path["compiled"] = True

    def setup(self, stage: str) -> None:
        """`inference_precision` (precision=auto's choice) or the Trainer's, but fp32 where that runs a slow
        fallback (bf16 on a CPU without native bf16), said once with the measured ratio."""
        requested = self.hparams.get("inference_precision") or choice_of(self.trainer.precision)
        choice, why = fast_inference_precision(requested, self.trainer.strategy.root_device)
        if why and self.inference_precision != choice:
            log.warning("%s", why)
        self.inference_precision = self.fast_path["inference_precision"] = choice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.contiguous(memory_format=self.memory_format))

    def compute_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # nnU-Net's AMP hygiene: softmax and the Dice sums over a whole patch stay in fp32
        with torch.autocast(logits.device.type, enabled=False):
            return segmentation_loss(self.loss, logits.float(), target)

    def step_loss(self, batch: dict) -> torch.Tensor:
        return self.compute_loss(self(batch["image"]), batch["label"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.step_loss(batch)
        # synced: under DDP the epoch value is the mean over every process's patches
        logged = {"on_step": True, "on_epoch": True, "prog_bar": True, "sync_dist": True}
        self.log("train/loss", loss, batch_size=len(batch["image"]), **logged)
        return loss

    def predict_volume(self, image: torch.Tensor) -> torch.Tensor:
        """Logits for whole volumes (validation), as `predict` and `evaluate` compute them."""
        hp = self.hparams
        # its own autocast, inside the Trainer's: validation may run in another precision than training
        with autocast(self.inference_precision, image.device) if self.inference_precision else nullcontext():
            return whole_volume_logits(self.net, image, hp.patch_size, hp.sw_overlap, hp.sw_batch_size)

    def validation_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        prediction = self.predict_volume(batch["image"]).argmax(1)
        self.update_val_dice(prediction, batch["label"][:, 0].long())
        return prediction  # for callbacks (callbacks.val_images draws it)

    def update_val_dice(self, prediction: torch.Tensor, reference: torch.Tensor) -> None:
        """Add (batch, *spatial) label maps to the Dice of each scored structure."""
        self.val_dice.update(*(structure_masks(maps, self.structures) for maps in (prediction, reference)))

    def on_validation_epoch_end(self) -> None:
        per_structure = self.val_dice.compute().reshape(-1)  # 0-d when one structure is scored
        self.val_dice.reset()
        # a structure absent from every case (and never predicted) is NaN, left out of the mean. torchmetrics
        # has gathered every process's cases: sync_dist averages equal values and only tells Lightning
        self.log("val/dice", per_structure.nanmean(), prog_bar=True, sync_dist=True)
        for name, value in zip(self.structures, per_structure, strict=True):
            self.log(f"val/dice_{name}", value, sync_dist=True)

    def configure_optimizers(self) -> dict:
        optimizer = self.build_optimizer(self.device, self.trainer.gradient_clip_val, self.trainer.precision)
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        scheduler = self.scheduler_factory(optimizer=optimizer)
        interval = self.hparams.scheduler_interval
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """Lightning's step; under fp16 AMP it also records whether the grad scaler skipped the update."""
        scaler = grad_scaler(self.trainer)
        before = loss_scale(scaler) if scaler is not None else None
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        if scaler is not None:
            # update() lowers the scale exactly when it skipped the step for inf/NaN gradients; no host sync
            self.amp_step_skipped = loss_scale(scaler) < before

    def lr_scheduler_step(self, scheduler, metric) -> None:
        # Lightning steps a step-interval scheduler after every batch, also one whose update the grad
        # scaler skipped: the schedule would run ahead of the weights (Lightning #5558, #18828)
        configs = self.trainer.lr_scheduler_configs
        step_interval = any(c.scheduler is scheduler and c.interval == "step" for c in configs)
        if not (step_interval and self.amp_step_skipped is not None and bool(self.amp_step_skipped)):
            super().lr_scheduler_step(scheduler, metric)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        stamp(checkpoint)  # the layout version: later code migrates or refuses it

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # resume and load_from_checkpoint: before the state dict is loaded, so a migration applies
        try:
            source = self.trainer.ckpt_path
        except RuntimeError:  # load_from_checkpoint: no Trainer
            source = None
        upgrade(checkpoint, source or "checkpoint")

    def build_optimizer(
        self, device: torch.device, clip: float | None, precision: str
    ) -> torch.optim.Optimizer:
        """The run's optimizer: `fused=True` where asked for, on a GPU, if the optimizer has the option."""
        self.fast_path["fused_optimizer"] = False
        target = getattr(self.optimizer_factory, "func", self.optimizer_factory)
        options = inspect.signature(target).parameters
        if not self.hparams.fused_adam or torch.device(device).type != "cuda":
            return self.optimizer_factory(params=self.parameters())
        if "fused" not in options:
            log.info("speed.fused_adam: %s has no fused kernel; using the plain one", target.__name__)
        elif clip and precision == "16-mixed":
            # Lightning refuses to clip gradients that a fused optimizer unscales internally
            log.warning(
                "speed.fused_adam: gradient clipping under precision=16 needs the plain optimizer; "
                "fused kernel off"
            )
        else:
            self.fast_path["fused_optimizer"] = True
            return self.optimizer_factory(params=self.parameters(), fused=True)
        # CUDA's default for an unfused optimizer, said explicitly (the planner builds it on fake CPU tensors)
        extra = {"foreach": True} if "foreach" in options else {}
        return self.optimizer_factory(params=self.parameters(), **extra)
