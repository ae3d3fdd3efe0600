"""What the bf16 workaround costs: the training step (forward, loss, backward, Adam) of the network a config
builds, with and without `fp32_where_bf16_conv_fails`, alternating step by step in one process on the same
batches, so that both see the same machine. Prints the medians and their ratio.

    python docs/benchmarks/bf16_cpu_nan/step_cost.py --steps 60 [OVERRIDES...]   # e.g. model.width=4

Run it as it is and with ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 (the kernels of a CPU without AMX)."""

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lightning_seg.model.cpu_bf16 import fp32_where_bf16_conv_fails
from lightning_seg.model.deep_supervision import segmentation_loss
from lightning_seg.precision import autocast
from lightning_seg.study.step_trainer import synthetic_batches

CONF = Path(__file__).resolve().parents[3] / "conf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["precision=bf16", *args.overrides])
    device = torch.device("cpu")
    torch.manual_seed(cfg.seed)
    plain = instantiate(cfg.model).train()
    nets = {"before": plain, "after": fp32_where_bf16_conv_fails(copy.deepcopy(plain))}
    optimizers = {name: torch.optim.Adam(net.parameters(), lr=1e-4) for name, net in nets.items()}
    loss_fn = instantiate(cfg.loss)
    batch_size = int(cfg.data.batch_size)
    batches = list(synthetic_batches(cfg, batch_size, device, args.warmup + args.steps))
    seconds = {name: [] for name in nets}
    for batch in batches:
        for name, net in nets.items():
            start = time.perf_counter()
            optimizers[name].zero_grad(set_to_none=True)
            with autocast(cfg.precision, device):
                logits = net(batch["image"])
            segmentation_loss(loss_fn, logits.float(), batch["label"]).backward()
            optimizers[name].step()
            seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(times[args.warmup :]) for name, times in seconds.items()}
    print(
        f"model {cfg.model._target_} width {cfg.model.get('width')}, patch {list(cfg.task.patch_size)}, "
        f"batch {batch_size}, {args.steps} steps each: before {median['before'] * 1e3:.1f} ms, "
        f"after {median['after'] * 1e3:.1f} ms, after/before {median['after'] / median['before']:.3f}"
    )


if __name__ == "__main__":
    main()
