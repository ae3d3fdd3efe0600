"""Resume in place: which checkpoint, whether the config still fits it, the split and W&B id it had.

`ckpt_path=last` continues the run in `hydra.run.dir`; a checkpoint outside it forks (a new run dir)."""

import logging
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_fabric.utilities.rank_zero import rank_zero_only

from lightning_seg.checkpoint_format import load_checkpoint
from lightning_seg.data.datamodule import split_in_checkpoint
from lightning_seg.distributed import in_slurm_job
from lightning_seg.errors import UserError
from lightning_seg.run_dir import RunDir, write_atomic

log = logging.getLogger(__name__)

# what a resumed run may not change: the cases it trains and validates on, and the network's shape
_SPLIT_KEYS = ("data.val_fraction", "data.test_fraction", "data.split_seed", "data.num_folds", "data.fold")
FIXED_KEYS = (*_SPLIT_KEYS, "task.msd_folder", "task.patch_size", "task.labels", "model")
_MISSING = "<unset>"


@dataclass
class Resume:
    """The checkpoint a run starts from and what it brings."""

    path: Path
    in_place: bool  # the checkpoint belongs to this run dir: continue it; otherwise a fork
    global_step: int
    run_config: dict[str, Any]
    split: dict[str, list] | None


def find_checkpoint(ckpt_path: str | None, run_dir: Path, trusted: Iterable[str] = ()) -> Resume | None:
    """The checkpoint `ckpt_path` names, memory-mapped, checked as every command checks one (`trusted`: what
    the user's config names): `last`: `RunDir.newest_checkpoint`; `None`: that one in a requeued SLURM job
    (as Lightning would load its hpc checkpoint); else the file. A run that does not continue `run_dir` may
    not start where a run already is."""
    run = RunDir(run_dir)
    if ckpt_path is None:
        path = run.newest_checkpoint() if in_slurm_job() else None
        if path is None:
            _refuse_existing_run(run)
            return None
        log.info("SLURM job restarted: continuing %s from %s", run_dir, path)
    elif str(ckpt_path) == "last":
        if (path := run.newest_checkpoint()) is None:
            raise UserError(
                f"ckpt_path=last: {run.last_checkpoint} does not exist. "
                f"Resume in place needs the run's own dir (hydra.run.dir={run_dir} is it?); "
                f"ckpt_path=<file> starts a new run from any checkpoint."
            )
    else:
        path = Path(ckpt_path).expanduser()
        if not path.is_file():
            raise UserError(f"ckpt_path={ckpt_path}: no such checkpoint file")
    # checked and migrated before its run_config and split are read: a refused one stops before any write
    checkpoint, run_config = load_checkpoint(path, trusted, mmap=True, needs_config=False)
    in_place = Path(os.path.realpath(run_dir)) in Path(os.path.realpath(path)).parents
    if not in_place:
        _refuse_existing_run(run)
    return Resume(
        path=path,
        in_place=in_place,
        global_step=int(checkpoint.get("global_step", 0)),
        run_config=run_config,
        split=split_in_checkpoint(checkpoint),
    )


def _refuse_existing_run(run: RunDir) -> None:
    if run.last_checkpoint.is_file():
        raise UserError(
            f"{run.path} holds a run already ({run.last_checkpoint}): add ckpt_path=last to continue it, "
            f"or give this run another hydra.run.dir"
        )


def changed_keys(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The FIXED_KEYS (leaves, as dotted names) whose values differ: `key: old -> new`."""
    old, new = _leaves(previous), _leaves(current)
    changes = []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, _MISSING), new.get(key, _MISSING)
        if any(f"{key}.".startswith(f"{fixed}.") for fixed in FIXED_KEYS) and before != after:
            changes.append(f"{key}: {before} -> {after}")
    return changes


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def prepare_in_place(resume: Resume, config: dict[str, Any], run_dir: Path) -> dict[str, list] | None:
    """Check that `config` (resolved) may continue the run, tidy what a kill left; return the split. The
    previous config comes from the checkpoint: Hydra has already replaced `.hydra/config.yaml`."""
    if resume.run_config and (changes := changed_keys(resume.run_config, config)):
        raise UserError(
            f"cannot resume {run_dir} in place: the config changes what the run was started with "
            f"(the data split or the network):\n  " + "\n  ".join(changes) + "\n"
            "Drop those overrides to continue it, or start a new run from its weights: "
            f"ckpt_path={resume.path} with a new hydra.run.dir."
        )
    run = RunDir(run_dir)
    run.remove_stale_tmp()
    if resume.split is not None:
        return resume.split
    if run.split_json.is_file():
        return run.read_split()
    log.warning(
        f"{resume.path} holds no split and {run.split_json} is missing: "
        "the split is recomputed from the config"
    )
    return None


def wandb_run_id(run_dir: Path, in_place: bool) -> str:
    """The stored W&B run id when resuming in place, else a new one, stored for a later resume."""
    id_file = RunDir(run_dir).wandb_run_id
    if in_place and id_file.is_file():
        return id_file.read_text().strip()
    run_id = uuid.uuid4().hex[:8]
    if rank_zero_only.rank == 0:  # other DDP processes log nothing to W&B and must not replace the id
        write_atomic(id_file, run_id + "\n")
    return run_id
