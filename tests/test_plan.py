"""The memory planner: fake-tensor predictions against a real CPU step, scaling, fit mode, CLI, GPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.profiler import ProfilerActivity, profile

from lightning_seg.config import CONFIG_DIR
from lightning_seg.errors import ConfigError
from lightning_seg.study.memory import largest_batch, train_step_memory
from lightning_seg.training import train

from .conftest import compose_config, tiny_synthetic_overrides

ROOT = Path(__file__).resolve().parents[1]


def plan_config(tmp_path: Path, *overrides: str) -> DictConfig:
    paths = [f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'outputs'}"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="plan", overrides=[*paths, *overrides])


def bench_config(tmp_path: Path, *overrides: str) -> DictConfig:
    paths = [f"paths.data_dir={tmp_path / 'data'}", f"paths.log_dir={tmp_path / 'outputs'}"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="bench", overrides=[*paths, "bench.warmup=3", "bench.steps=3", *overrides])


def profiled_step_peak(cfg: DictConfig) -> int:
    """Peak bytes of a real CPU training step, from torch.profiler's allocation events: the live
    tensors at the start (weights, Adam state, inputs) plus the running sum of allocations and frees."""
    torch.manual_seed(0)
    module = instantiate(cfg.module).train()  # the real MONAI DiceLoss, not the planner's stand-in
    net = module.net
    # as a GPU run builds it (the planner predicts for one), on the CPU's tensors
    optimizer = module.build_optimizer(torch.device("cuda"), None, "32-true")
    batch, patch = cfg.data.batch_size, list(cfg.task.patch_size)
    image = torch.randn(batch, 1, *patch)
    label = torch.randint(0, len(cfg.task.labels), (batch, 1, *patch)).float()

    def step():
        loss = module.step_loss({"image": image, "label": label})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        del loss
        optimizer.step()

    step()  # Adam's state exists from here on
    # no gradients at the start: the profiler cannot see a tensor allocated before it started being freed
    optimizer.zero_grad(set_to_none=True)
    state = [v for s in optimizer.state.values() for v in s.values()]
    alive = [*net.parameters(), *net.buffers(), *state, image, label]
    start = sum(t.untyped_storage().nbytes() for t in alive)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return start + peak


@pytest.mark.parametrize("model", ["basic_unet", "dynunet"])
def test_fp32_prediction_matches_a_real_cpu_step_measured_by_the_profiler(tmp_path, model):
    # width 16: oneDNN pads fewer than 8-16 channels in its blocked layouts, a CPU-only cost; the
    # profiled step keeps no average of the weights
    point = f"model={model}", "model.width=16", "task.patch_size=[32,32,32]"
    cfg = plan_config(tmp_path, *point, "callbacks.weight_average=null")
    predicted = train_step_memory(cfg, workspace_bytes=0).peak_bytes  # no cuDNN on a CPU
    measured = profiled_step_peak(cfg)
    assert predicted == pytest.approx(measured, rel=0.10)


def test_activations_scale_with_the_batch_and_amp_is_below_fp32(tmp_path):
    cfg = plan_config(tmp_path, "model.width=4", "task.patch_size=[48,48,48]")
    b2, b8 = train_step_memory(cfg, batch=2), train_step_memory(cfg, batch=8)
    assert b8.breakdown["activations"] == pytest.approx(4 * b2.breakdown["activations"], rel=0.03)
    assert b8.breakdown["weights"] == b2.breakdown["weights"]
    for amp in ("16", "bf16"):
        half = train_step_memory(cfg, batch=8, precision=amp)
        # at width 4 the fp32 input and the int64 pooling indices are a large share: AMP saves ~20% here
        assert half.peak_bytes - half.breakdown["cudnn_workspace"] < 0.9 * (b8.peak_bytes - 2**29)
        assert half.breakdown["activations"] < 0.8 * b8.breakdown["activations"]
        assert half.breakdown["amp_weight_copies"] > 0
    assert train_step_memory(cfg, batch=8, precision="tf32").peak_bytes == b8.peak_bytes


def test_the_weight_average_adds_one_copy_of_the_weights_and_the_bare_loop_none(tmp_path):
    point = "model.width=4", "task.patch_size=[32,32,32]"
    averaged = train_step_memory(plan_config(tmp_path, *point))  # callbacks.weight_average: on by default
    raw = train_step_memory(plan_config(tmp_path, *point, "callbacks.weight_average=null"))
    assert averaged.breakdown["averaged_weights"] == averaged.breakdown["weights"] > 0
    assert raw.breakdown["averaged_weights"] == 0
    assert averaged.peak_bytes - raw.peak_bytes == averaged.breakdown["weights"]
    assert train_step_memory(plan_config(tmp_path, *point), loop="bare").breakdown["averaged_weights"] == 0


def test_cuda_autocast_keeps_instance_norm_in_half_where_cpu_autocast_would_not(tmp_path):
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lightning_seg.study.memory.cuda_autocast import CudaAutocast

    with FakeTensorMode():
        conv, norm = torch.nn.Conv3d(1, 4, 3), torch.nn.InstanceNorm3d(4, affine=True)
        x = torch.randn(1, 1, 8, 8, 8)
        with CudaAutocast(torch.float16):
            y = norm(conv(x))
            assert y.dtype == torch.float16  # CUDA: instance norm runs in its input's dtype
            assert torch.softmax(y, 1).dtype == torch.float32  # fp32 list, via dtype=
            assert (y**2).dtype == torch.float32  # pow: fp32 list
            first = conv.weight  # the parameter's half copy is cached for the region
            conv(x)
        assert first.dtype == torch.float32


def test_fit_mode_picks_the_largest_batch_whose_prediction_fits(tmp_path):
    cfg = plan_config(tmp_path, "model.width=4", "task.patch_size=[32,32,32]", "data.samples_per_volume=1")
    cfg.plan.cudnn_workspace_gib = 0.0  # the activations, not the fixed allowance, decide here
    free = 3 * train_step_memory(cfg, batch=5).peak_bytes  # somewhere between batches, whatever they cost
    batch, predicted = largest_batch(cfg, free, margin=0.1)
    budget = free * 0.9
    assert batch > 5
    assert predicted == train_step_memory(cfg, batch=batch).peak_bytes <= budget
    assert train_step_memory(cfg, batch=batch + 1).peak_bytes > budget
    assert largest_batch(cfg, 1000, margin=0.1)[0] == 0  # nothing fits in a kilobyte


def test_cli_writes_plan_json_with_peak_breakdown_sliding_window_and_fit_table(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run(
        [
            sys.executable, "-m", "lightning_seg.study.memory", "model.width=4", "precision=16",
            "plan.gpu_memory_gib=2", "plan.max_patch=128", f"hydra.run.dir={out}",
            f"paths.data_dir={tmp_path / 'data'}",
        ],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "plan.json").read_text())
    assert result["peak_gib"] > 0 and result["precision"] == "16"
    assert {"weights", "averaged_weights", "gradients", "optimizer", "activations", "transient"} <= result[
        "breakdown_gib"
    ].keys()
    assert result["config"]["weight_average"] is True  # training's default, counted in the peak
    assert result["sliding_window"]["volume"] == [64, 64, 48]  # the synthetic task's cases
    assert [r["precision"] for r in result["fit"]["rows"]] == ["32", "tf32", "16", "bf16"]
    assert "predicted peak" in done.stdout and "largest batch" in done.stdout


def test_an_unknown_card_is_one_error_line(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "lightning_seg.study.memory", "plan.gpu=GTX480", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2 and "error: plan.gpu=GTX480: choose one of V100-16" in done.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("model", ["basic_unet", "dynunet", "monai_unet"])
@pytest.mark.parametrize("precision", ["32", "16"])
def test_prediction_matches_max_memory_allocated_on_the_gpu(tmp_path, model, precision):
    from lightning_seg.study.bench.step import measure

    cfg = bench_config(tmp_path, f"model={model}", "task.patch_size=[64,64,64]", f"precision={precision}")
    predicted = train_step_memory(cfg).peak_bytes
    # the real Trainer step, from before the warm-up, as the references
    measured = measure(cfg, cfg.data.batch_size, torch.device("cuda"))["peak_with_warmup_gib"] * 2**30
    assert predicted == pytest.approx(measured, rel=0.10)


def test_automatic_batch_needs_a_gpu_and_says_so(tmp_path):
    cfg = compose_config(tmp_path, [*tiny_synthetic_overrides(), "data.batch_size=auto"])
    with pytest.raises(ConfigError, match="no GPU here: give a number"):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_automatic_batch_records_prediction_and_measured_peak(tmp_path):
    overrides = [*tiny_synthetic_overrides(), "hardware=gpu", "data.batch_size=auto", "trainer.max_epochs=1"]
    train(compose_config(tmp_path, overrides))
    auto = json.loads((tmp_path / "run" / "environment.json").read_text())["fast_path"]["auto_batch"]
    # 5 training cases: the batch the memory allows is capped at what the cases supply, and predicted again
    assert auto["chosen"] >= auto["capped_by_cases"] == 10
    assert 0 < auto["measured_train_peak_gib"] < auto["predicted_peak_gib"] <= auto["free_gib"]


MODEL_CHOICES = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
OBJECTIVES = [  # recipe and loss: clipping and the schedule come with the recipe
    ("reference_talk", "dice"),
    ("reference_talk", "dice_ce"),
    ("nnunet", "dice_ce"),
    ("nnunet", "dice"),
]


@pytest.mark.parametrize("model", MODEL_CHOICES)
@pytest.mark.parametrize("recipe,loss", OBJECTIVES)
def test_the_fake_step_allocates_what_the_module_step_allocates_on_real_tensors(
    tmp_path, model, recipe, loss
):
    # the planner runs the module's own step on fake tensors with a stand-in for MONAI's loss (which
    # reads values); on real CPU tensors it runs that loss itself: both must charge the same blocks
    point = [f"model={model}", "model.width=4", "task.patch_size=[32,32,32]", "data.batch_size=1"]
    variants = [["precision=16"], ["precision=32", "callbacks.weight_average=null"]]
    if model == "dynunet":
        variants.append(["precision=bf16", "model.deep_supervision=false"])
    for variant in variants:
        cfg = plan_config(tmp_path, *point, f"recipe={recipe}", f"loss={loss}", *variant)
        fake = train_step_memory(cfg, workspace_bytes=0)
        real = train_step_memory(cfg, workspace_bytes=0, fake=False)
        assert abs(fake.peak_bytes - real.peak_bytes) <= 4 * 512, (variant, fake.breakdown, real.breakdown)
