"""Lightning's training step against a plain PyTorch loop: same network, patch, batch and data.

The plain loop is zero_grad, the module's own `step_loss` (forward and loss), backward, step over the
same MONAI DataLoader, with nothing of Lightning around it. Both draw batches from the project's own
cached datamodule, run alternately, and are timed per step from one batch start to the next (data
loading, logging and the progress bar included). Prints the median step times and their ratio.

usage: python -m lightning_seg.study.bench.overhead [--data-dir $DATA_DIR] [--task hippocampus]
"""

import itertools
import statistics
import tempfile
import time
from argparse import ArgumentParser, RawDescriptionHelpFormatter

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from pytorch_lightning import seed_everything
from pytorch_lightning.callbacks import LambdaCallback
from pytorch_lightning.loggers import CSVLogger

from lightning_seg.config import CONFIG_DIR
from lightning_seg.environment import environment_info
from lightning_seg.study.bench.__main__ import prepared_datamodule
from lightning_seg.trainers import build_trainer


def plain_loop(cfg, datamodule, steps: int) -> list[float]:
    seed_everything(cfg.seed)
    module = instantiate(cfg.module)
    optimizer = module.build_optimizer(module.device, None, "32-true")
    starts = []
    while len(starts) < steps:
        for batch in datamodule.train_dataloader():
            starts.append(time.perf_counter())
            if len(starts) == steps:
                break
            optimizer.zero_grad()
            module.step_loss(batch).backward()
            optimizer.step()
    return starts


def lightning_loop(cfg, datamodule, steps: int, log_dir: str) -> list[float]:
    seed_everything(cfg.seed)
    module = instantiate(cfg.module)
    starts = []
    timer = LambdaCallback(on_train_batch_start=lambda *_: starts.append(time.perf_counter()))
    build_trainer(
        cfg,
        max_steps=steps,
        max_epochs=None,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[timer, instantiate(cfg.callbacks.training_clock)],
        logger=CSVLogger(log_dir, name="", version="overhead"),
    ).fit(module, datamodule=datamodule)
    return starts


def step_times(starts: list[float], warmup: int) -> list[float]:
    return [b - a for a, b in itertools.pairwise(starts[warmup:])]


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="folder holding the MSD task folder (default: synthetic)")
    parser.add_argument("--task", help="task config (default: hippocampus with --data-dir)")
    parser.add_argument("--steps", type=int, default=60, help="timed steps per repeat")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=basic_unet")
    args = parser.parse_args()

    tmp = tempfile.mkdtemp(prefix="overhead-")
    task = args.task or ("hippocampus" if args.data_dir else "synthetic")
    data_dir = args.data_dir or f"{tmp}/data"
    overrides = [f"task={task}", "hardware=cpu", "precision=32", f"paths.data_dir={data_dir}"]
    overrides += [f"paths.output_dir={tmp}", f"paths.cache_dir={tmp}/cache", *args.overrides]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    datamodule = prepared_datamodule(cfg)

    n = args.steps + args.warmup + 1
    plain, lightning = [], []
    for repeat in range(args.repeats):  # alternate, so drifts in machine load hit both alike
        plain += step_times(plain_loop(cfg, datamodule, n), args.warmup)
        lightning += step_times(lightning_loop(cfg, datamodule, n, tmp), args.warmup)
        p, lt = statistics.median(plain), statistics.median(lightning)
        print(f"repeat {repeat}: plain {p:.4f} s/step, lightning {lt:.4f} s/step", flush=True)

    env = environment_info()
    print(
        f"\ntask={task} model={cfg.model._target_.rsplit('.', 1)[-1]} patch={list(cfg.task.patch_size)} "
        f"batch={cfg.data.batch_size} precision=32 device=cpu ({env['cpu_count']} cores, "
        f"torch {env['torch']}, {env['torch_threads']} threads)"
    )
    print(f"plain loop      median {p:.4f} s/step over {len(plain)} steps")
    print(f"lightning_seg   median {lt:.4f} s/step over {len(lightning)} steps")
    print(f"ratio lightning/plain = {lt / p:.3f}  (overhead {100 * (lt / p - 1):+.1f}%)")


if __name__ == "__main__":
    main()
