"""`lightning-seg-new-task` (USAGE; also `python -m lightning_seg.new_task`): checks and fingerprints every
case of a labelled folder (MSD or nnU-Net v2 raw), plans its task config and writes it as `task/NAME.yaml`
with the fingerprint beside it (README: "Where the file goes")."""

import datetime
import json
import logging
import os
import re
import sys
from pathlib import Path

import nibabel as nib
from hydra import compose, initialize_config_dir

from lightning_seg.config import CONFIG_DIR, cpu_count, repo_root, user_config_dir
from lightning_seg.data import layout
from lightning_seg.data.checks import check_dataset
from lightning_seg.entry import user_errors
from lightning_seg.errors import ConfigError
from lightning_seg.new_task.fingerprint import fingerprint
from lightning_seg.new_task.plan import Target, plan_task
from lightning_seg.precision import PRECISIONS, label
from lightning_seg.preprocess import preprocess
from lightning_seg.run_dir import write_atomic, write_json
from lightning_seg.study.memory.fit import GPUS

USAGE = (
    "lightning-seg-new-task DIR name=NAME [gpu=CARD | gpu_memory_gib=G] [precision=P] [config_dir=DIR] "
    "[cache_dir=DIR] [workers=N] [max_image_gib=G] [allow_outside_paths=true] [preprocess=true]"
)
OPTIONS = ("name", "gpu", "gpu_memory_gib", "precision", "config_dir", "cache_dir", "workers", "preprocess")
OPTIONS += ("max_image_gib", "allow_outside_paths")  # what the folder may cost and reach (SECURITY.md)
DEFAULT_GIB, DEFAULT_PRECISION = 24.0, "16"
MARKER = "# planned by lightning-seg-new-task"  # a file without it is hand-written: never overwritten


def parse(argv: list[str]) -> tuple[Path, dict]:
    folders = [a for a in argv if "=" not in a]
    options = dict(a.split("=", 1) for a in argv if "=" in a)
    unknown = sorted(set(options) - set(OPTIONS))
    if len(folders) != 1 or unknown or "name" not in options:
        problem = f"unknown option(s) {', '.join(unknown)}" if unknown else "give one DIR and name=NAME"
        raise ConfigError(f"{problem}; usage: {USAGE}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", options["name"]):
        raise ConfigError(f"name={options['name']}: use letters, digits, _ and - (it names a config file)")
    return Path(folders[0]).expanduser().resolve(), options


def target_of(options: dict) -> Target:
    gpu, gib, precision = options.get("gpu"), options.get("gpu_memory_gib"), options.get("precision")
    if precision is not None and precision not in PRECISIONS:
        raise ConfigError(f"precision={precision}: choose one of {', '.join(PRECISIONS)}")
    if gpu == "cpu":
        return Target("cpu", None, precision)
    if gpu is not None and gib is not None:
        raise ConfigError("give gpu=CARD or gpu_memory_gib=G, not both")
    if gpu is not None and gpu not in GPUS:
        raise ConfigError(f"gpu={gpu}: choose cpu or one of {', '.join(GPUS)}, or give gpu_memory_gib=G")
    try:
        capacity = float(GPUS[gpu]) if gpu else float(gib) if gib else DEFAULT_GIB
    except ValueError:
        raise ConfigError(
            f"gpu_memory_gib={gib}: give the card's memory in GiB, e.g. gpu_memory_gib=24"
        ) from None
    return Target(gpu or f"a {capacity:g} GB card", capacity, precision or DEFAULT_PRECISION)


def new_task(folder: Path, options: dict) -> tuple[list, Path]:
    name, target = options["name"], target_of(options)  # a bad option stops before the long part
    # conf/task of a checkout; an installed package's conf/ is not the user's to write
    default = (user_config_dir() if CONFIG_DIR.parent.name == "lightning_seg" else CONFIG_DIR) / "task"
    out = Path(options["config_dir"]).expanduser() / "task" if "config_dir" in options else default
    target_file = out / f"{name}.yaml"
    shipped = CONFIG_DIR / "task" / f"{name}.yaml"  # it would hide a user config of that name
    for taken in {shipped, target_file}:
        if taken.is_file() and MARKER not in taken.read_text():
            raise ConfigError(f"name={name}: the hand-written {taken} has that name; pick another name")
    meta = layout.read_dataset_json(folder)
    declared = layout.declared_labels(meta, folder / "dataset.json")
    if declared is None:
        raise layout.DatasetError(
            f"{folder / 'dataset.json'}: declares no labels (MSD's 'labels', or nnU-Net's name -> value)"
        )
    labels, regions = declared
    outside = options.get("allow_outside_paths", "false").lower() == "true"
    cases = layout.read_datalist(folder, outside)
    channels = layout.declared_channels(meta)
    if channels is None:  # MSD without 'modality': the first case's headers say how many
        shapes = [nib.load(path).shape for path in layout.image_files(cases[0]["image"])]
        channels = [f"channel_{c}" for c in range(sum(s[3] if len(s) == 4 else 1 for s in shapes))]
    workers = int(options.get("workers", cpu_count()))
    # every broken case, before the fingerprint; remembered where training looks (paths.cache_dir, its
    # default unless given), so the first run does not check the cases again
    cache = Path(options.get("cache_dir") or Path(repo_root()) / "cache")
    max_gib = float(options["max_image_gib"]) if "max_image_gib" in options else None
    check_dataset(folder, labels, len(channels), cache, workers, max_gib, outside)
    print(f"fingerprinting {len(cases)} cases of {folder} ...", flush=True)
    prints = fingerprint(cases, workers)
    task, decisions = plan_task(name, str(folder), prints, labels, regions, channels, target)
    write_json(out / f"{name}.fingerprint.json", prints)
    write_atomic(target_file, task_yaml(target, task, decisions, len(cases)))
    return decisions, target_file


def task_yaml(target: Target, task: dict, decisions: list, num_cases: int) -> str:
    value = {d.key: d.value for d in decisions}
    why = {d.key: d.why for d in decisions}
    name = task["name"]
    made_for = "a CPU" if target.capacity_gib is None else f"{target.name} in {label(target.precision)}"
    lines = [
        "# @package _global_",
        f"{MARKER} from {task['msd_folder']} ({num_cases} cases) for {made_for},",
        f"# {datetime.date.today()}. Each value says what chose it; edit any key, or override it on the",
        f"# command line. Planning again overwrites this file. Fingerprint: {name}.fingerprint.json.",
        "defaults:",
        "  - _schema@task  # every key, its type and default: lightning_seg/task.py",
        f"  - override /model: {value['model']}  # {why['model']}",
        "  - _self_",
        "",
    ]
    if target.precision is not None:
        lines.append(f"precision: {target.precision}  # the precision the batch and patch were sized for")
    lines += ["data:", f"  batch_size: {value['data.batch_size']}  # {why['data.batch_size']}"]
    lines += [f"  flip_axes: {value['data.flip_axes']}  # {why['data.flip_axes']}", "", "task:"]
    for key, value in task.items():
        comment = why.get(f"task.{key}")
        if value is not None:
            lines.append(f"  {key}: {json.dumps(value)}" + (f"  # {comment}" if comment else ""))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with user_errors():
        folder, options = parse(sys.argv[1:] if argv is None else argv)
        decisions, written = new_task(folder, options)
    for d in decisions:
        print(f"  {d.key}: {json.dumps(d.value)}  <- {d.why}")
    print(f"wrote {written} and {written.with_suffix('.fingerprint.json').name} beside it")
    root = written.parent.parent
    hint = "" if root in (CONFIG_DIR, user_config_dir()) else f"LIGHTNING_SEG_CONFIG_DIR={root} "
    if options.get("preprocess", "false").lower() == "true":  # nnU-Net's plan_and_preprocess in one go
        with user_errors():
            print(preprocess_planned(options, root), flush=True)
    print(f"train it: {hint}python train.py task={options['name']}")


def preprocess_planned(options: dict, config_root: Path) -> str:
    """Write the store the first training of the planned task would write (the same composed config)."""
    if config_root not in (CONFIG_DIR, user_config_dir()):
        os.environ["LIGHTNING_SEG_CONFIG_DIR"] = str(config_root)  # where Hydra finds the planned file
    overrides = [f"task={options['name']}", f"data.prep_workers={int(options.get('workers', cpu_count()))}"]
    if "cache_dir" in options:
        overrides.append(f"paths.cache_dir={Path(options['cache_dir']).expanduser().resolve()}")
    overrides += [
        f"data.{key}={options[key]}" for key in ("max_image_gib", "allow_outside_paths") if key in options
    ]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return preprocess(compose(config_name="train", overrides=overrides))


if __name__ == "__main__":
    main()
