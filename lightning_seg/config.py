"""What conf/ relies on (OmegaConf resolvers, the task schema, the user's config dir) and where it is."""

import os
from pathlib import Path

import torch
from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.config_store import ConfigStore
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin
from omegaconf import OmegaConf

from lightning_seg.distributed import launch_environment
from lightning_seg.precision import trainer_precision
from lightning_seg.task import TaskConfig

# conf/ inside an installed wheel (setup.py maps it there), else the checkout's top-level conf/
_INSTALLED_CONF = Path(__file__).resolve().parent / "conf"
CONFIG_DIR = _INSTALLED_CONF if _INSTALLED_CONF.is_dir() else _INSTALLED_CONF.parents[1] / "conf"


def user_config_dir() -> Path:
    """The user's own config groups (lightning-seg-new-task's `task/<name>.yaml` for an installed package)."""
    return Path(os.environ.get("LIGHTNING_SEG_CONFIG_DIR") or Path.home() / ".config" / "lightning_seg")


class UserConfigSearchPath(SearchPathPlugin):
    """`user_config_dir()` after the package's conf/: a plugin, because `hydra.searchpath` counts only in a
    primary config, and bench.yaml, plan.yaml and check.yaml include train.yaml."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        if user_config_dir().is_dir():  # Hydra warns about a search path entry that does not exist
            search_path.append(provider="lightning_seg-user", path=f"file://{user_config_dir()}")


def repo_root() -> str:
    """The checkout holding this package (editable installs), else the launch directory."""
    root = Path(__file__).resolve().parents[1]
    return str(root if (root / "pyproject.toml").exists() else Path.cwd())


def cpu_count() -> int:
    """The cores this process may run on (a SLURM job's or a container's share, not the machine's)."""
    return len(os.sched_getaffinity(0))


def default_workers() -> int:
    """0 on CPU-only machines (the training step already uses every core), else the cores per GPU less
    the one the training process needs: patches are read and augmented in the workers."""
    if not torch.cuda.is_available():
        return 0
    return max(1, cpu_count() // torch.cuda.device_count() - 1)


def process_name(name: str) -> str:
    """`name` in global rank 0; `<name>_ddp_process_<rank>` in the other processes srun or torchrun started
    (each runs Hydra itself), as Lightning names those it starts: one process writes the run's log."""
    rank = launch_environment().global_rank()
    return f"{name}_ddp_process_{rank}" if rank else name


def in_rank_zero(value: str) -> str | None:
    """`value` in global rank 0, None in the other processes (hydra.output_subdir: one writes .hydra/)."""
    return None if launch_environment().global_rank() else value


_RESOLVERS = {
    "repo_root": repo_root,
    "default_workers": default_workers,
    "cpu_count": cpu_count,
    "len": len,
    "not": lambda value: not value,
    # not True, which stops runs: 3D max-pool and trilinear upsampling have no deterministic CUDA backward
    "deterministic_mode": lambda reproducible: "warn" if reproducible else False,
    "max": max,
    # no epoch cap (-1) under a time budget: trainer.max_time then ends the run (and a budget-aware LR)
    "epochs_within": lambda max_epochs, max_time: -1 if max_time else max_epochs,
    "trainer_precision": trainer_precision,
    "basename": lambda path: Path(path).name,
    "join_path": lambda folder, name: str(Path(folder) / name),  # an absolute `name` wins
    "process_name": process_name,
    "in_rank_zero": in_rank_zero,
    # SLURM refuses a GPU request on a node without GPUs: a CPU run asks for none
    "gpus_for": lambda accelerator, devices: None if accelerator == "cpu" else devices,
}
for _name, _resolver in _RESOLVERS.items():
    if not OmegaConf.has_resolver(_name):
        OmegaConf.register_new_resolver(_name, _resolver)
ConfigStore.instance().store(group="task", name="_schema", node=TaskConfig)
Plugins.instance().register(UserConfigSearchPath)
