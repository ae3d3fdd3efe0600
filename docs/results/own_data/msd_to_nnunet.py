"""Write an MSD task folder in nnU-Net v2 raw layout (one 3D file per channel, name -> value labels).

    python docs/results/own_data/msd_to_nnunet.py MSD_TASK_DIR OUT_DIR [--link]

`--link` symlinks the single-channel images and the labels instead of copying them (same bytes).
The project reads both layouts; this is how the two were compared on the same cases.
"""

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np


def convert(task_dir: Path, out: Path, link: bool) -> int:
    meta = json.loads((task_dir / "dataset.json").read_text())
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    (out / "labelsTr").mkdir(parents=True, exist_ok=True)
    channels = {str(k): v for k, v in meta["modality"].items()}
    for entry in meta["training"]:
        image, label = task_dir / entry["image"], task_dir / entry["label"]
        case = label.name.removesuffix(".nii.gz")
        if len(channels) == 1 and link:
            (out / "imagesTr" / f"{case}_0000.nii.gz").symlink_to(image.resolve())
        else:
            img = nib.load(image)
            data = np.asanyarray(img.dataobj)
            for c in range(len(channels)):
                part = data if data.ndim == 3 else data[..., c]
                nib.save(
                    nib.Nifti1Image(part, img.affine, img.header), out / "imagesTr" / f"{case}_{c:04d}.nii.gz"
                )
        target = out / "labelsTr" / f"{case}.nii.gz"
        target.symlink_to(label.resolve()) if link else target.write_bytes(label.read_bytes())
    dataset = {
        "channel_names": channels,
        "labels": {name: int(value) for value, name in meta["labels"].items()},
        "numTraining": len(meta["training"]),
        "file_ending": ".nii.gz",
        "name": meta.get("name", task_dir.name),
    }
    (out / "dataset.json").write_text(json.dumps(dataset, indent=2))
    return len(meta["training"])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--link", action="store_true")
    args = parser.parse_args()
    print(f"{convert(args.task_dir, args.out, args.link)} cases -> {args.out}")
