"""What a checkpoint may make Hydra build: a checkpoint is data, never code (SECURITY.md).

Predict, evaluate, validate and training from a checkpoint rebuild the network, loss, optimizer, module
and data from its `run_config` with Hydra's `instantiate`, which imports and calls whatever a `_target_`
names. So every `_target_` in it (nested, in `_args_`, `_partial_` or not; only the NEVER_REBUILT keys
aside) must be one the project builds: named by a config file of conf/ or of the user's
config dir, a torch optimizer or scheduler, or named by the user's own config and command line
(`trusted_targets=[...]`, any `_target_` they set). Nothing the file itself adds counts. `${...}`
interpolations are refused there too: a resolver (`oc.create`) can build a `_target_` this check never
saw, and training saves its config resolved. What passes is built first on the meta device (`build`):
settings promising other shapes than the file's weights are refused before they cost memory."""

import inspect
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from lightning_seg.config import CONFIG_DIR, user_config_dir
from lightning_seg.errors import UserError

TARGET = "_target_"
# no command builds these from a checkpoint, and older checkpoints name classes there that have moved since
NEVER_REBUILT = ("trainer", "callbacks", "logger")
SHOWN = 80  # characters of a refused value shown: the file chose them (terminal escapes, kilobytes)


class UntrustedCheckpointError(UserError):
    """A checkpoint naming code the project does not build; the message names the file and the key."""


def project_targets() -> set[str]:
    """What the project builds: every `_target_` of conf/ and of the user's config dir, torch's optimizers
    and schedulers (conf/optimizer/ takes any of them)."""
    found = set()
    for folder in (CONFIG_DIR, user_config_dir()):
        for path in sorted(folder.rglob("*.yaml")) if folder.is_dir() else []:
            found |= {value for _, value in targets(OmegaConf.to_container(OmegaConf.load(path)))}
    for module, base in ((torch.optim, torch.optim.Optimizer), (torch.optim.lr_scheduler, object)):
        classes = [(n, getattr(module, n)) for n in module.__all__]
        found |= {f"{module.__name__}.{n}" for n, c in classes if inspect.isclass(c) and issubclass(c, base)}
    return found


def named_by(cfg: DictConfig | dict) -> set[str]:
    """What the user's own config names: its `trusted_targets` and every `_target_` in it (unresolved:
    `${...}` values are the user's own)."""
    tree = OmegaConf.to_container(cfg) if isinstance(cfg, DictConfig) else cfg
    listed = tree.get("trusted_targets") or ()
    listed = [listed] if isinstance(listed, str) else listed  # trusted_targets=mypkg.Net: one name
    return {str(t) for t in listed} | {str(v) for _, v in targets(tree)}


def check_run_config(config: Any, source: str | Path, trusted: Iterable[str] = ()) -> None:
    """Refuse `config` (a checkpoint's run_config) if it names a `_target_` outside the project's and
    `trusted`, or holds an interpolation there; before anything it names is imported."""
    if not isinstance(config, dict):
        raise UntrustedCheckpointError(f"{source}: its run_config is a {type(config).__name__}, not settings")
    config = {key: value for key, value in config.items() if key not in NEVER_REBUILT}
    for key, value in strings(config):
        if "${" in value:
            raise UntrustedCheckpointError(
                f"{source}: {key} = {_shown(value)} is an interpolation; training saves its config "
                "resolved, so the file was edited; refused (SECURITY.md)"
            )
    allowed = project_targets() | set(trusted)
    for key, value in targets(config):
        if not isinstance(value, str) or value not in allowed:
            raise UntrustedCheckpointError(
                f"{source}: {key} = {_shown(value)} is not something lightning_seg builds; refused before "
                f"importing it (a checkpoint is data, never code). If you trust this file and that code, "
                f"add trusted_targets=[...] naming it (SECURITY.md)"
            )


def build(node: dict, weights: dict, source: str | Path, key: str, **kwargs: Any) -> Any:
    """`instantiate(node, **kwargs)` for a checked checkpoint's `key` settings whose state must be
    `weights`: built first on the meta device (shapes, no memory), so settings promising another network
    (a width of 4096: terabytes) are refused before they cost memory."""
    with torch.device("meta"):
        built = {name: tuple(t.shape) for name, t in instantiate(node, **kwargs).state_dict().items()}
    held = {name: tuple(t.shape) for name, t in weights.items()}
    if differ := sorted(n for n in built.keys() | held.keys() if built.get(n) != held.get(n)):
        first = differ[0]
        raise UntrustedCheckpointError(
            f"{source}: its {key} settings build other shapes than its weights hold ({len(differ)} tensors, "
            f"e.g. {first}: {built.get(first)} against {held.get(first)}); refused before building it"
        )
    return instantiate(node, **kwargs)


def targets(tree: Any, key: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, value) of every `_target_` in nested dicts and lists, as OmegaConf names keys."""
    for name, child, path in _children(tree, key):
        if name == TARGET:
            yield path, child
        else:
            yield from targets(child, path)


def strings(tree: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """(dotted key, value) of every string value in nested dicts and lists."""
    if isinstance(tree, str):
        yield key, tree
    for _, child, path in _children(tree, key):
        yield from strings(child, path)


def _children(tree: Any, key: str) -> Iterator[tuple[Any, Any, str]]:
    """(name, child, its dotted key) of a dict's or list's items."""
    if isinstance(tree, dict):
        yield from ((name, child, f"{key}.{name}" if key else str(name)) for name, child in tree.items())
    elif isinstance(tree, list | tuple):
        yield from ((i, child, f"{key}[{i}]") for i, child in enumerate(tree))


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= SHOWN else text[: SHOWN - 3] + "..."
