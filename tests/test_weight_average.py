"""The EMA of the weights that validation, checkpoints and the final model use."""

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from lightning_seg.callbacks.weight_average import WarmupEMA, WeightAverage
from lightning_seg.errors import ConfigError
from lightning_seg.training import train

from .conftest import compose_config, tiny_synthetic_overrides


def test_the_decay_warms_up_with_the_update_count_then_holds():
    ema = WarmupEMA(0.999)
    assert ema.current_decay(0) == pytest.approx(0.1)
    assert ema.current_decay(90) == pytest.approx(0.91)
    assert ema.current_decay(10**6) == 0.999


def test_averaged_model_copies_then_follows_the_warmed_up_decay():
    model = torch.nn.Linear(3, 1)
    average = AveragedModel(model, multi_avg_fn=WarmupEMA(0.999))
    w0 = torch.full_like(model.weight, 1.0)
    w1 = torch.full_like(model.weight, 12.0)
    with torch.no_grad():
        model.weight.copy_(w0)
        average.update_parameters(model)  # the first update copies
        model.weight.copy_(w1)
        average.update_parameters(model)  # one update done: decay (1 + 1) / (10 + 1)
    assert torch.allclose(average.module.weight, 2 / 11 * w0 + 9 / 11 * w1)


@pytest.mark.parametrize("decay", [1.0, -0.1])
def test_a_decay_outside_zero_to_one_is_refused_by_name(decay):
    with pytest.raises(ConfigError, match="callbacks.weight_average.decay"):
        WeightAverage(decay)


def test_without_the_average_checkpoints_hold_the_raw_weights_only(tmp_path):
    cfg = compose_config(
        tmp_path, [*tiny_synthetic_overrides(), "trainer.max_epochs=1", "callbacks.weight_average=null"]
    )
    train(cfg)
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert "current_model_state" not in last and "WeightAverage" not in last["callbacks"]
