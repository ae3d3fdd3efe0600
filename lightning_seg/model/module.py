"""LightningModule: a 3D segmentation network, soft Dice loss, sliding-window validation."""

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import sliding_window_inference
from pytorch_lightning import LightningModule
from torch import nn
from torchmetrics.segmentation import DiceScore


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

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
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return {"optimizer": optimizer}
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer=optimizer), "interval": "epoch"},
        }
