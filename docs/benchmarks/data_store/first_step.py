"""A callback for measure.py: seconds from the process's launch to its first training step."""

import json
import time
from pathlib import Path

import psutil
from pytorch_lightning import Callback


class FirstStep(Callback):
    def __init__(self, out: str) -> None:
        self.out = Path(out)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0 and not self.out.exists():
            since = time.time() - psutil.Process().create_time()
            self.out.write_text(json.dumps({"since_launch_s": since}))
