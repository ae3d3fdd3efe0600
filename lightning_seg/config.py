"""OmegaConf resolvers used by conf/ and the conf directory's location."""

import os
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

from lightning_seg.precision import trainer_precision
from lightning_seg.task import register as register_task_schema


def config_dir() -> Path:
    """conf/ inside an installed wheel (setup.py maps it there), else the checkout's top-level conf/."""
    package = Path(__file__).resolve().parent
    installed = package / "conf"
    return installed if installed.is_dir() else package.parent / "conf"


CONFIG_DIR = config_dir()


def user_config_dir() -> Path:
    """Config groups of the user's own (`task/<name>.yaml`, as lightning-seg-new-task writes them for
    an installed package): $LIGHTNING_SEG_CONFIG_DIR, else ~/.config/lightning_seg."""
    return Path(os.environ.get("LIGHTNING_SEG_CONFIG_DIR") or Path.home() / ".config" / "lightning_seg")


class UserConfigSearchPath(SearchPathPlugin):
    """Puts `user_config_dir()` on Hydra's search path, after the package's conf/, for every entry
    point. A plugin, because `hydra.searchpath` counts only in a primary config, and bench.yaml,
    plan.yaml and check.yaml include train.yaml."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if user_config_dir().is_dir():  # Hydra warns about a search path entry that does not exist
            search_path.append(provider="lightning_seg-user", path=f"file://{user_config_dir()}")


def repo_root() -> str:
    """The checkout holding this package (editable installs), else the launch directory."""
    root = Path(__file__).resolve().parents[1]
    return str(root if (root / "pyproject.toml").exists() else Path.cwd())


def default_workers() -> int:
    """Loader workers: none on CPU-only machines (patches come from the in-memory cache and
    workers would only compete with the training threads), a few per GPU otherwise."""
    import torch

    if not torch.cuda.is_available():
        return 0
    return min(8, max(1, (os.cpu_count() or 2) // 2))


def deterministic_mode(reproducible: bool) -> bool | str:
    """Lightning's `deterministic` for the `reproducible` switch: "warn" rather than True, because
    3D max-pool and trilinear upsampling have no deterministic CUDA backward and would stop the run."""
    return "warn" if reproducible else False


def epochs_within(max_epochs: int, max_time: str | None) -> int:
    """The task's epoch cap, or none (-1) when a time budget is set: `trainer.max_time` then decides
    when the run, and a budget-aware learning-rate schedule, end."""
    return -1 if max_time else max_epochs


def _register() -> None:
    resolvers = {
        "repo_root": repo_root,
        "default_workers": default_workers,
        "len": len,
        "not": lambda value: not value,
        "deterministic_mode": deterministic_mode,
        "max": max,
        "epochs_within": epochs_within,
        "trainer_precision": trainer_precision,
        "basename": lambda path: Path(path).name,
        "join_path": lambda folder, name: str(Path(folder) / name),  # an absolute `name` wins
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
    register_task_schema()
    Plugins.instance().register(UserConfigSearchPath)


_register()
