"""Peak memory, logged with every validation."""

from pytorch_lightning import Callback, LightningModule, Trainer

from lightning_seg.memory import peak_memory_gib


class PeakMemory(Callback):
    """Logs `memory/peak_gib`: peak GPU memory allocated by PyTorch, or peak RSS on CPU."""

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            pl_module.log("memory/peak_gib", peak_memory_gib(pl_module.device))
