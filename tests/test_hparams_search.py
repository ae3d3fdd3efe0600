"""hparams_search=optuna: Hydra's Optuna sweeper searches, and writes what it found."""

import json

import yaml

from .conftest import multirun, tiny_synthetic_overrides
from .test_time_to_accuracy import wandb_records


def test_two_trial_optuna_search_writes_its_result(tmp_path):
    arguments = [
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        # fixed values leave the search; learning rate and loss stay in it
        "data.batch_size=2",
        "trainer.max_epochs=1",
        *tiny_synthetic_overrides(),
    ]
    sweep = multirun(tmp_path, arguments)
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert result["name"] == "optuna"
    assert set(result["best_params"]) == {"optimizer.optimizer.lr", "loss"}
    assert 1e-4 <= result["best_params"]["optimizer.optimizer.lr"] <= 1e-2
    assert result["best_params"]["loss"] in ("dice", "dice_ce")
    # the best value is a trial's best val/dice, as train.py's main returned it
    finals = [json.loads((sweep / trial / "final_metrics.json").read_text()) for trial in ("0", "1")]
    assert result["best_value"] == max(f["best/val_dice"] for f in finals)
    # each trial trained with the values Optuna suggested, and logged to W&B in the sweep's group
    groups = set()
    for trial in ("0", "1"):
        overrides = yaml.safe_load((sweep / trial / ".hydra" / "overrides.yaml").read_text())
        assert any(o.startswith("optimizer.optimizer.lr=") for o in overrides)
        assert any(o.startswith("loss=") for o in overrides)
        (records_file,) = (sweep / trial / "wandb").glob("offline-run-*/run-*.wandb")
        groups.add(next(r["run"]["run_group"] for r in wandb_records(records_file) if r["type"] == "run"))
    assert len(groups) == 1
