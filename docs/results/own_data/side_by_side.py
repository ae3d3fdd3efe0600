"""Plan the same nnU-Net v2 raw folders with lightning-seg-new-task and nnU-Net v2's default planner.

    python docs/results/own_data/side_by_side.py WORK NNUNET_BIN [DatasetNNN_Name folders ...]

WORK gets the synthetic folders (`--synthetic`: the kinds of data the own-data issue names, thick-slice
MRI, a two-channel tumour set with five labels, CT in int16, a two-contrast MRI in int16, and a large
CT), nnU-Net's raw/preprocessed trees, our planned configs, nnU-Net's plans (`nnunet_plans/`), `plans.json`
(both planners' plans per folder) and `table.md`.
NNUNET_BIN is the bin folder of a venv with nnunetv2 (`pip install nnunetv2`, kept apart from this
project's). nnU-Net's axes (SimpleITK's: the file's array axes reversed, then `transpose_forward`) are
mapped to ours (RAS, as training resamples) through the first case's affine.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import yaml

from lightning_seg.data.layout import ras_axes, read_datalist
from lightning_seg.data.synthetic import write_synthetic_nnunet
from lightning_seg.model.nets import plan_topology

THREE = {"background": 0, "a": 1, "b": 2}
SYNTHETIC = {
    "Dataset101_ThickT2": dict(
        geometry=[
            ((64, 64, n), (0.6, 0.6, z)) for n, z in [(10, 4.5), (12, 4.0), (14, 3.6), (16, 3.0), (12, 4.0)]
        ],
        channels={"0": "T2"},
        labels=THREE,
    ),
    "Dataset102_TwoChannelTumour": dict(
        geometry=[((56, 56, 48), (1.0, 1.0, 1.0))] * 6,
        channels={"0": "FLAIR", "1": "T1"},
        labels={"background": 0, "whole": [1, 2, 3, 4], "core": [2, 3, 4], "enhancing": 3, "necrosis": 4},
        num_labels=5,
    ),
    "Dataset103_CTint16": dict(
        geometry=[((80, 80, 40), (0.78, 0.78, 2.5)), ((72, 72, 36), (0.85, 0.85, 2.5))] * 3,
        channels={"0": "CT"},
        labels=THREE,
        ct=True,
        dtype="int16",
    ),
    # large enough that neither planner takes the whole median image: the patch follows the budget
    "Dataset105_LargeCT": dict(
        geometry=[((256, 256, 200), (0.75, 0.75, 1.0)), ((240, 240, 180), (0.8, 0.8, 1.0))] * 2,
        channels={"0": "CT"},
        labels=THREE,
        ct=True,
        dtype="int16",
    ),
    "Dataset104_ProstateLikeInt16": dict(
        geometry=[((80, 80, 20), (0.5, 0.5, 3.6)), ((72, 72, 24), (0.6, 0.6, 3.0))] * 3,
        channels={"0": "T2", "1": "ADC"},
        labels=THREE,
        dtype="int16",
    ),
}


def ours(folder: Path, work: Path) -> dict:
    name = folder.name.lower()
    command = [
        sys.executable,
        "-m",
        "lightning_seg.new_task",
        str(folder),
        f"name={name}",
        f"config_dir={work / 'conf'}",
    ]
    subprocess.run(command, check=True, capture_output=True, text=True)
    plan = yaml.safe_load((work / "conf" / "task" / f"{name}.yaml").read_text())
    task = plan["task"]
    strides = plan_topology(task["patch_size"], 5, task["spacing"]).strides
    return {
        "spacing": task["spacing"],
        "normalization": task["normalization"]["kind"],
        "crop_foreground": task["crop_foreground"],
        "patch_size": task["patch_size"],
        "batch_size": plan["data"]["batch_size"],
        "strides": [list(s) for s in strides],
    }


def nnunet(folder: Path, work: Path, bin_dir: Path) -> dict:
    raw = work / "nnUNet_raw"
    raw.mkdir(parents=True, exist_ok=True)
    if not (raw / folder.name).exists():
        (raw / folder.name).symlink_to(folder.resolve())
    trees = {f"nnUNet_{t}": str(work / f"nnUNet_{t}") for t in ("raw", "preprocessed", "results")}
    env = {**os.environ, **trees, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    number = str(int(folder.name[len("Dataset") : len("Dataset") + 3]))
    for step in (["nnUNetv2_extract_fingerprint", "--clean"], ["nnUNetv2_plan_experiment"]):
        subprocess.run([step[0], "-d", number, *step[1:]], check=True, capture_output=True, env=env)
    plans_file = work / "nnUNet_preprocessed" / folder.name / "nnUNetPlans.json"
    (work / "nnunet_plans").mkdir(exist_ok=True)
    shutil.copy(plans_file, work / "nnunet_plans" / f"{folder.name}.json")
    plans = json.loads(plans_file.read_text())
    fullres = plans["configurations"]["3d_fullres"]
    # nnU-Net axis t is the file's array axis 2 - transpose_forward[t]; RAS axis r is array axis ras[r]
    to_file = [2 - a for a in plans["transpose_forward"]]
    first = read_datalist(folder)[0]
    ras = ras_axes(nib.load(first["label"]))
    order = [to_file.index(int(axis)) for axis in ras]

    def in_ras(values):
        return [values[t] for t in order]

    return {
        "spacing": [round(s, 6) for s in in_ras(fullres["spacing"])],
        "normalization": fullres["normalization_schemes"],
        "use_mask_for_norm": fullres["use_mask_for_norm"],
        "patch_size": in_ras(fullres["patch_size"]),
        "batch_size": fullres["batch_size"],
        "strides": [in_ras(s) for s in fullres["architecture"]["arch_kwargs"]["strides"][1:]],
    }


def row(name: str, a: dict, b: dict) -> str:
    diff = float(np.abs(np.array(a["spacing"]) - np.array(b["spacing"])).max())
    masks = ",".join(str(m) for m in b["use_mask_for_norm"])
    schemes = ",".join(s.replace("Normalization", "") for s in b["normalization"])
    cells = [name, a["spacing"], b["spacing"], f"{diff:.2g}", a["normalization"], f"{schemes} (mask {masks})"]
    cells += [a["strides"][0], b["strides"][0], f"{a['patch_size']} b{a['batch_size']}"]
    cells += [f"{b['patch_size']} b{b['batch_size']}"]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("nnunet_bin", type=Path)
    parser.add_argument("folders", type=Path, nargs="*")
    parser.add_argument("--synthetic", action="store_true")
    args = parser.parse_args()
    folders = list(args.folders)
    if args.synthetic:
        for name, kwargs in SYNTHETIC.items():
            shutil.rmtree(args.work / "data" / name, ignore_errors=True)
            folders.append(write_synthetic_nnunet(args.work / "data" / name, **kwargs))
    results, lines = (
        {},
        [
            "| dataset | our spacing (RAS) | nnU-Net's | max diff mm | our normalization | nnU-Net's "
            "| our first strides | nnU-Net's | our patch, batch (24 GB, fp16) | nnU-Net's (8 GB) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ],
    )
    for folder in folders:
        results[folder.name] = {
            "ours": ours(folder, args.work),
            "nnunet": nnunet(folder, args.work, args.nnunet_bin),
        }
        lines.append(row(folder.name, results[folder.name]["ours"], results[folder.name]["nnunet"]))
        print(lines[-1], flush=True)
    (args.work / "plans.json").write_text(json.dumps(results, indent=1))
    (args.work / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
