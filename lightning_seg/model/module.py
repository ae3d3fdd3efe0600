"""LightningModule: a 3D segmentation network, soft Dice loss, sliding-window validation."""

import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from pytorch_lightning import LightningModule
from torch import nn
from torchmetrics.segmentation import DiceScore

from lightning_seg.model.compile import compile_unavailable_reason

log = logging.getLogger(__name__)


class SegmentationModule(LightningModule):
    """Train on random patches, validate on whole volumes.

    Logs `train/loss`, `val/dice` (mean over foreground labels, cases averaged per label)
    and `val/dice_<label>`.
    """

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
    ) -> None:
        super().__init__()
        # plain data only, so checkpoints load with torch.load(weights_only=True); run_config (the
        # resolved Hydra config) is what rebuilds net, loss and optimizer
        self.save_hyperparameters(ignore=["net", "loss", "optimizer", "scheduler"], logger=False)
        self.net, self.loss = net, loss
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.labels = list(labels)
        self.val_dice = DiceScore(
            num_classes=len(self.labels), include_background=False, average="none", input_format="index"
        )
        self.memory_format = torch.channels_last_3d if channels_last_3d else torch.contiguous_format
        # what the fast-path switches became on this machine (environment.json records it)
        self.fast_path: dict[str, Any] = {"compiled": False, "channels_last_3d": channels_last_3d}

    def configure_model(self) -> None:
        """Memory layout and torch.compile, applied once before the first step (Lightning calls this
        hook on every fit/validate, inside the strategy's context, before optimizers exist)."""
        if self.memory_format is torch.channels_last_3d:
            self.net.to(memory_format=self.memory_format)
        if not self.hparams.compile or self.fast_path["compiled"]:
            return
        reason = compile_unavailable_reason(self.trainer.strategy.root_device)
        if reason:
            log.warning("speed.compile=true, but %s: the network runs eagerly", reason)
            self.fast_path["compile_fallback"] = reason
            return
        # in place: the state dict keeps its keys (no `_orig_mod.`), so checkpoints load anywhere
        self.net.compile(backend=self.hparams.compile_backend)
        self.fast_path["compiled"] = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.contiguous(memory_format=self.memory_format))

    def compute_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # nnU-Net's AMP hygiene: softmax and the Dice sums over a whole patch stay in fp32
        with torch.autocast(logits.device.type, enabled=False):
            return self.loss(logits.float(), target)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(self(batch["image"]), batch["label"])
        self.log(
            "train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(batch["image"])
        )
        return loss

    def predict_volume(self, image: torch.Tensor) -> torch.Tensor:
        """Logits for whole volumes by Gaussian-weighted sliding windows of the training patch."""
        return sliding_window_inference(
            image,
            roi_size=self.hparams.patch_size,
            sw_batch_size=self.hparams.sw_batch_size,
            predictor=self.net,
            overlap=self.hparams.sw_overlap,
            mode="gaussian",
        )

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self.predict_volume(batch["image"])
        self.val_dice.update(logits.argmax(1), batch["label"][:, 0].long())

    def on_validation_epoch_end(self) -> None:
        per_label = self.val_dice.compute().reshape(-1)  # 0-d when there is one foreground label
        self.val_dice.reset()
        # a label absent from every case (and never predicted) is NaN and left out of the mean
        self.log("val/dice", per_label.nanmean(), prog_bar=True)  # torchmetrics syncs across processes
        for name, value in zip(self.labels[1:], per_label, strict=True):
            self.log(f"val/dice_{name}", value)

    def configure_optimizers(self) -> dict:
        optimizer = self.optimizer_factory(params=self.parameters(), **self._fused_kwargs())
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer), "interval": "epoch"},
        }

    def _fused_kwargs(self) -> dict:
        """`fused=True` where it is asked for, the device is a GPU and the optimizer has the option."""
        self.fast_path["fused_optimizer"] = False
        if not self.hparams.fused_adam or self.device.type != "cuda":
            return {}
        target = getattr(self.optimizer_factory, "func", self.optimizer_factory)
        if "fused" not in inspect.signature(target).parameters:
            log.info("speed.fused_adam: %s has no fused kernel; using the plain one", target.__name__)
            return {}
        trainer = self.trainer
        if trainer.gradient_clip_val and trainer.precision == "16-mixed":
            # Lightning refuses to clip gradients that a fused optimizer unscales internally
            log.warning(
                "speed.fused_adam: gradient clipping under precision=16 needs the plain optimizer; "
                "fused kernel off"
            )
            return {}
        self.fast_path["fused_optimizer"] = True
        return {"fused": True}
