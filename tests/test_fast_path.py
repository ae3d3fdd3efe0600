"""The fast path: speed flags by default, reproducibility on request, compile, data wait, memory split."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from lightning_seg.environment import known_problems
from lightning_seg.inference import Predictor
from lightning_seg.training import train

from .conftest import compose_config, tiny_synthetic_overrides

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU; none on this machine"
)


@pytest.fixture
def restore_torch_flags():
    """Lightning sets process-wide torch flags from the Trainer's arguments: put them back."""
    benchmark = torch.backends.cudnn.benchmark
    yield
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.benchmark = benchmark


@pytest.mark.parametrize(
    "reproducible, benchmark, deterministic", [(False, True, False), (True, False, True)]
)
def test_speed_by_default_and_deterministic_kernels_on_request(
    tmp_path, restore_torch_flags, reproducible, benchmark, deterministic
):
    cfg = compose_config(
        tmp_path, [*tiny_synthetic_overrides(), "trainer.fast_dev_run=true", f"reproducible={reproducible}"]
    )
    assert cfg.trainer.benchmark is benchmark
    train(cfg)
    env = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert env["cudnn_benchmark"] is benchmark
    assert env["deterministic_algorithms"] is deterministic
    # 3D max-pool has no deterministic CUDA backward: a warning, not a stopped run
    assert env["deterministic_warn_only"] is deterministic
    assert env["fast_path"] == {
        "compiled": False,
        "channels_last_3d": False,
        "fused_optimizer": False,
        "inference_precision": "32",
    }


def run_short(tmp_path, *overrides: str):
    cfg = compose_config(
        tmp_path,
        [
            *tiny_synthetic_overrides(),
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=3",
            "trainer.log_every_n_steps=1",
            *overrides,
        ],
        data_dir=tmp_path.parent / "data",
    )
    metrics, objects = train(cfg)
    return metrics, objects, pd.read_csv(tmp_path / "run" / "csv" / "metrics.csv")


def test_compiled_training_matches_eager_and_its_checkpoint_loads_for_prediction(tmp_path):
    _, _, eager = run_short(tmp_path / "eager")
    _, objects, compiled = run_short(tmp_path / "compiled", "speed.compile=true")
    assert objects["module"].fast_path["compiled"] is True
    # same seed, same batches: the compiled network computes the same losses
    losses = [
        frame.dropna(subset=["train/loss_step"])["train/loss_step"].to_numpy() for frame in (eager, compiled)
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3, abs=1e-4)
    val = compiled.dropna(subset=["val/dice"]).iloc[-1]
    assert val["time/compile_s"] > 0  # graph capture and kernel builds, paid inside time/train_s
    assert val["time/train_s"] > val["time/compile_s"]
    [ckpt] = (tmp_path / "compiled" / "run" / "checkpoints").glob("best-*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert not [k for k in state if "_orig_mod" in k]
    predictor = Predictor(ckpt, device="cpu")  # strict load_state_dict: every key matches
    weights = {f"net.{k}": v for k, v in predictor.nets[0][0].state_dict().items()}
    assert all(torch.equal(weights[k], v) for k, v in state.items() if k.startswith("net."))


def test_data_wait_and_throughput_are_logged_with_each_validation(tmp_path):
    _, _, log = run_short(tmp_path)
    val = log.dropna(subset=["val/dice"]).iloc[-1]
    assert 0.0 <= val["time/data_wait_s"] < val["time/train_s"]
    assert 0.0 <= val["perf/data_wait_frac"] < 1.0
    assert val["perf/data_wait_frac"] == pytest.approx(
        val["time/data_wait_s"] / val["time/train_s"], rel=1e-3
    )
    # 3 steps of 2 patches over the training time
    assert val["perf/samples_per_s"] == pytest.approx(6 / val["time/train_s"], rel=1e-3)
    # on a CPU the process peak is all there is, and it is said to be so
    assert val["memory/peak_gib"] > 0 and "memory/train_peak_gib" not in log


@needs_cuda
@pytest.mark.gpu
def test_training_and_validation_peaks_are_measured_apart(tmp_path):
    # whole 128 x 128 x 96 volumes in validation against 32^3 training patches
    _, _, log = run_short(
        tmp_path, "task.synthetic.shape=[128,128,96]", "hardware=gpu", "module.sw_batch_size=16"
    )
    val = log.dropna(subset=["val/dice"]).iloc[-1]
    assert 0 < val["memory/train_peak_gib"] < val["memory/val_peak_gib"]


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("clip, fused", [(0.0, True), (1.0, False)])
def test_fused_adam_on_gpu_and_plain_adam_where_lightning_refuses_it(tmp_path, clip, fused):
    _, objects, log = run_short(
        tmp_path, "hardware=gpu", "precision=16", f"+trainer.gradient_clip_val={clip}"
    )
    assert objects["module"].fast_path["fused_optimizer"] is fused
    assert log["train/loss_step"].dropna().map(lambda v: v == v).all()  # finite, no NaN


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("precision, mode", [("32", "ieee"), ("tf32", "tf32")])
def test_tf32_switches_follow_the_precision_choice_on_gpu(tmp_path, precision, mode):
    cfg = compose_config(
        tmp_path,
        [*tiny_synthetic_overrides(), "hardware=gpu", f"precision={precision}", "trainer.fast_dev_run=true"],
    )
    train(cfg)
    env = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert env["gpu"] and env["tf32_cudnn_conv"] == mode and env["tf32_matmul"] == mode


@pytest.mark.parametrize(
    "torch_version,cudnn,precision,issues",
    [
        ("2.9.0+cu128", 91002, "16", ["#166122"]),
        ("2.9.0+cu128", 91002, "bf16", ["#166122", "#163539", "#166643"]),
        ("2.9.1+cu128", 91400, "bf16", ["#166643"]),
        ("2.9.0+cu128", 91002, "32", []),
        ("2.13.0+cpu", None, "bf16", []),
        ("2.11.0+cu130", 91900, "bf16", []),
    ],
)
def test_published_3d_convolution_problems_are_named_for_the_precision(
    torch_version, cudnn, precision, issues
):
    problems = known_problems({"torch": torch_version, "cudnn": cudnn}, precision)
    assert [next(word for word in p.split() if "#" in word).strip("():") for p in problems] == [
        f"pytorch/pytorch{issue}" for issue in issues
    ]


def test_a_run_on_a_known_bad_torch_warns_and_records_it(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch, "__version__", "2.9.0+cpu")
    # the warning comes before the first step; bf16 on this tiny network may diverge on a CPU (not under test)
    overrides = ["precision=bf16", "trainer.max_epochs=1", "callbacks.amp_guard=null"]
    cfg = compose_config(tmp_path, [*tiny_synthetic_overrides(), *overrides])
    with caplog.at_level("WARNING", logger="lightning_seg.training"):
        train(cfg)
    assert any("pytorch/pytorch#166122" in r.getMessage() for r in caplog.records)
    env = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert env["known_problems"] and "#166122" in env["known_problems"][0]
    assert env["cpu_capability"] and isinstance(env["cpu_native_bf16"], bool)


def test_bf16_training_on_a_cpu_without_native_bf16_validates_in_fp32_and_says_why(
    tmp_path, slow_cpu_bf16, caplog
):
    overrides = ["precision=bf16", "trainer.max_epochs=1", "callbacks.amp_guard=null"]
    cfg = compose_config(tmp_path, [*tiny_synthetic_overrides(), *overrides])
    with caplog.at_level("WARNING", logger="lightning_seg.model.module"):
        _, objects = train(cfg)
    [line] = [r.getMessage() for r in caplog.records if "no native bf16" in r.getMessage()]
    assert "42.0x as long as in fp32" in line and "validation and prediction run in fp32" in line
    env = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert env["fast_path"]["inference_precision"] == "32"
    module, seen = objects["module"], []
    module.net.register_forward_hook(lambda net, args, out: seen.append(out.dtype))
    image = torch.randn(1, 1, 32, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what Lightning's bf16 plugin wraps validation in
        module.predict_volume(image)
        module.inference_precision = "bf16"
        module.predict_volume(image)
    assert seen == [torch.float32, torch.bfloat16]  # the network's windows: fp32 here, bf16 where fast


def test_prediction_on_a_cpu_without_native_bf16_runs_in_fp32(slow_cpu_bf16, caplog):
    checkpoint = Path(__file__).parent / "fixtures" / "synthetic_width4_v1.ckpt"
    with caplog.at_level("WARNING", logger="lightning_seg.inference"):
        predictor = Predictor(checkpoint, device="cpu", precision="bf16")
    assert predictor.precision == "32"
    assert any("42.0x" in r.getMessage() for r in caplog.records)
    assert Predictor(checkpoint, device="cpu", precision="32").precision == "32"
