"""One config: the benchmark and the planner compose train.yaml, so every training override means the
same to them. For every config group and every top-level key of train.yaml, the override is accepted
by all three and resolves to the same module, loss, optimizer, precision and trainer settings."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lightning_seg.config import CONFIG_DIR
from lightning_seg.errors import ConfigError
from lightning_seg.task import check_task

ENTRIES = ("train", "bench", "plan", "check")
COMPARED = (
    "module",
    "loss",
    "optimizer",
    "precision",
    "inference_precision",
    "auto_precision",
    "trainer",
    "data",
    "task",
    "callbacks",
)


def train_groups() -> list[str]:
    """The config groups train.yaml's defaults list names (Hydra's own `hydra` group aside)."""
    defaults = OmegaConf.load(CONFIG_DIR / "train.yaml").defaults
    groups = []
    for entry in defaults:
        if isinstance(entry, str):
            continue
        (key,) = entry.keys()
        group = key.removeprefix("optional ")
        if group != "hydra":
            groups.append(group)
    return groups


def group_overrides() -> list[str]:
    overrides = []
    for group in train_groups():
        choices = sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))
        assert choices, group
        overrides += [f"{group}={choice}" for choice in choices]
    return overrides


# a value for every top-level key of train.yaml that differs from its default
TOP_LEVEL = {
    "seed": "seed=7",
    "precision": "precision=bf16",
    "inference_precision": "inference_precision=32",
    "auto_precision": "auto_precision.margin=0.1",
    "reproducible": "reproducible=true",
    "verbose": "verbose=true",
    "ckpt_path": "ckpt_path=last",
    "trusted_targets": "trusted_targets=[mypkg.nets.MyNet]",
    "checkpoint_every_min": "checkpoint_every_min=2",
    "trainer": "trainer.gradient_clip_val=3",
}


def test_every_top_level_key_of_train_yaml_is_covered():
    keys = set(OmegaConf.load(CONFIG_DIR / "train.yaml").keys()) - {"defaults", "hydra"}
    assert keys == set(TOP_LEVEL)


def resolved(name: str, overrides: list[str], tmp_path: Path) -> dict:
    paths = [f"paths.{key}_dir={tmp_path / key}" for key in ("data", "log", "cache", "output")]
    # the entries' own defaults differ on purpose (the benchmark's spleen): name the task explicitly
    task = [] if any(o.startswith("task=") for o in overrides) else ["task=synthetic"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=name, overrides=[*paths, *task, *overrides])
    return {
        key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        for key in COMPARED
    }


@pytest.mark.parametrize("override", [*group_overrides(), *TOP_LEVEL.values(), "recipe=nnunet loss=dice"])
def test_an_override_means_the_same_to_every_entry_point(tmp_path, override):
    overrides = override.split()
    training = resolved("train", overrides, tmp_path)
    for name in ENTRIES[1:]:
        assert resolved(name, overrides, tmp_path) == training, name


def test_the_recipe_reaches_what_the_benchmark_times(tmp_path):
    bench = resolved("bench", ["recipe=nnunet"], tmp_path)
    assert bench["loss"]["_target_"] == "monai.losses.DiceCELoss"
    assert bench["trainer"]["gradient_clip_val"] == 12 and bench["optimizer"]["schedule"] == "poly"


def test_a_misspelled_task_key_fails_at_composition_naming_it(tmp_path):
    task_dir = tmp_path / "conf" / "task"
    task_dir.mkdir(parents=True)
    good = (CONFIG_DIR / "task" / "spleen.yaml").read_text()
    (task_dir / "typo.yaml").write_text(good.replace("patch_size:", "pach_size:"))
    (task_dir / "short.yaml").write_text(good.replace("  patch_size: [128, 128, 128]\n", ""))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        search = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
        with pytest.raises(Exception, match="Key 'pach_size' not in 'TaskConfig'"):
            compose(config_name="train", overrides=[search, "task=typo"])
        cfg = compose(config_name="train", overrides=[search, "task=short"])
    with pytest.raises(ConfigError, match=r"task.patch_size: not set; give it in conf/task/spleen.yaml"):
        check_task(cfg)
