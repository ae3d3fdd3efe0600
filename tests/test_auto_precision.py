"""precision=auto: the probe's choice from its timings; a run that trains, validates and predicts by it."""

import json

import pytest
import torch

from lightning_seg import precision
from lightning_seg.errors import ConfigError
from lightning_seg.inference import Predictor
from lightning_seg.study import auto_precision
from lightning_seg.training import train

from .conftest import compose_config, tiny_synthetic_overrides

CPU = torch.device("cpu")
GPU_ORDER = ["32", "tf32", "bf16", "16"]


@pytest.mark.parametrize(
    ("seconds", "chosen"),
    [
        ({"32": 1.0, "tf32": 0.6, "bf16": 0.3, "16": 0.2}, "16"),  # fp16 clearly fastest
        ({"32": 1.0, "tf32": 0.6, "bf16": 0.3, "16": 0.29}, "bf16"),  # fp16 within the margin: bf16
        ({"32": 1.0, "tf32": 0.97, "bf16": 0.98, "16": 0.99}, "32"),  # nothing pays: full precision
        ({"32": 1.0, "tf32": 0.7, "bf16": None, "16": 0.9}, "tf32"),  # bf16 unsafe (non-finite)
        ({"32": None, "tf32": None, "bf16": None, "16": 0.5}, "16"),  # only fp16 fits in memory
        ({"32": None, "bf16": None}, "32"),  # nothing timed: fp32
    ],
)
def test_the_fastest_safe_choice_wins_and_a_less_precise_one_needs_the_margin(seconds, chosen):
    assert auto_precision.fastest(seconds, GPU_ORDER, margin=0.05) == chosen


def stub_timings(monkeypatch, training: dict, inference: dict) -> list[str]:
    """The probe's two measurements replaced by the given records; the choices it timed, in order."""
    timed = []

    def time_training(cfg, choice, device, batch, limit_s):
        timed.append(choice)
        return training[choice]

    monkeypatch.setattr(auto_precision, "time_training", time_training)
    monkeypatch.setattr(auto_precision, "time_inference", lambda cfg, choice, device: inference[choice])
    return timed


def test_a_precision_whose_loss_is_not_finite_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)  # bf16 worth timing on any CPU
    cfg = compose_config(tmp_path, [*tiny_synthetic_overrides(), "precision=auto"])
    stub_timings(
        monkeypatch,
        training={"32": {"step_s": 0.2}, "bf16": {"error": "non-finite loss (nan)"}},
        inference={"32": {"batch_s": 0.2}, "bf16": {"batch_s": 0.05}},
    )
    record = auto_precision.probe(cfg, CPU)
    assert record["train"] == "32" and record["inference_precision"] == "bf16"
    lines = auto_precision.describe(record)
    assert (
        "non-finite loss" in lines[2]
        and "training in fp32, validation and prediction in bf16 AMP" in lines[-1]
    )


def test_without_native_bf16_the_probe_does_not_time_bf16_and_chooses_fp32(
    tmp_path, monkeypatch, slow_cpu_bf16
):
    cfg = compose_config(tmp_path, [*tiny_synthetic_overrides(), "precision=auto"])
    timed = stub_timings(monkeypatch, {"32": {"step_s": 0.2}}, {"32": {"batch_s": 0.1}})
    record = auto_precision.probe(cfg, CPU)
    assert timed == ["32"]  # a 10-40x slower step is not worth a probe's time
    assert record["train"] == record["inference_precision"] == "32"
    assert "42.0x as long as in fp32" in record["training"]["bf16"]["error"]


def test_a_run_with_precision_auto_trains_validates_and_predicts_by_its_measured_choice(tmp_path, caplog):
    overrides = [
        *tiny_synthetic_overrides(),
        "precision=auto",
        "trainer.max_epochs=1",
        "callbacks.amp_guard=null",
    ]
    with caplog.at_level("INFO", logger="lightning_seg.study.auto_precision"):
        _, objects = train(compose_config(tmp_path, overrides))
    env = json.loads((tmp_path / "run" / "environment.json").read_text())
    record = env["precision_auto"]
    assert set(record["training"]) == {"32", "bf16"}  # what a CPU offers
    assert record["training"]["32"]["step_s"] > 0 and record["inference"]["32"]["batch_s"] > 0
    table = [r.getMessage() for r in caplog.records if r.name == "lightning_seg.study.auto_precision"]
    assert table[0].startswith("precision=auto on cpu") and "-> training in" in table[-1]
    trainer, module = objects["trainer"], objects["module"]
    assert trainer.precision == {"32": "32-true", "bf16": "bf16-mixed"}[record["train"]]
    assert module.inference_precision == record["inference_precision"]
    card = json.loads((tmp_path / "run" / "checkpoints" / "model_card.json").read_text())
    assert card["precision"] == record["train"] and card["precision_auto"] == record
    assert card["inference_precision"] == record["inference_precision"]
    # prediction, unless told otherwise, runs in the inference precision the run measured
    predictor = Predictor(tmp_path / "run" / "checkpoints" / "last.ckpt", device="cpu")
    assert predictor.precision == record["inference_precision"]
    assert (
        Predictor(tmp_path / "run" / "checkpoints" / "last.ckpt", device="cpu", precision="32").precision
        == "32"
    )


def test_a_resumed_auto_run_keeps_its_choice_without_a_new_probe(tmp_path, monkeypatch):
    overrides = [*tiny_synthetic_overrides(), "precision=auto", "callbacks.amp_guard=null"]
    train(compose_config(tmp_path, [*overrides, "trainer.max_epochs=1"]))
    first = json.loads((tmp_path / "run" / "environment.json").read_text())["precision_auto"]
    monkeypatch.setattr(auto_precision, "probe", lambda cfg, device: pytest.fail("a resume probes again"))
    train(compose_config(tmp_path, [*overrides, "trainer.max_epochs=2", "ckpt_path=last"]))
    assert json.loads((tmp_path / "run" / "environment.json").read_text())["precision_auto"] == first


def test_auto_is_refused_where_it_cannot_be_measured(tmp_path):
    cfg = compose_config(tmp_path, [*tiny_synthetic_overrides(), "precision=auto", "trainer.num_nodes=2"])
    with pytest.raises(ConfigError, match="num_nodes > 1 name the precision"):
        auto_precision.choose(cfg)
    with pytest.raises(ConfigError, match="precision=auto is chosen by training at start-up"):
        precision.trainer_precision("auto")
