"""Does keeping only the largest connected component of each label (nnU-Net's post-processing check)
change the Dice of saved predictions? Usage:
    python docs/results/hippocampus_ablation_cpu/largest_component.py PREDICTIONS_DIR LABELS_DIR
(PREDICTIONS_DIR: `evaluate`'s `predictions/`; LABELS_DIR: the task's `labelsTr`)."""

import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2 * (a & b).sum() / total


def largest_component(mask: np.ndarray) -> np.ndarray:
    components, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum(mask, components, range(1, count + 1))
    return components == np.argmax(sizes) + 1


predictions, labels = Path(sys.argv[1]), Path(sys.argv[2])
rows = []
for path in sorted(predictions.glob("*.nii.gz")):
    pred = np.asarray(nib.load(path).dataobj).astype(int)
    ref = np.asarray(nib.load(labels / path.name).dataobj).astype(int)
    values = [v for v in np.unique(ref) if v > 0]
    rows.append(
        [np.mean([dice(pred == v, ref == v) for v in values]),
         np.mean([dice(largest_component(pred == v), ref == v) for v in values]),
         sum(ndimage.label(pred == v)[1] > 1 for v in values)]
    )  # fmt: skip
scores = np.array(rows)
print(f"{len(scores)} cases: foreground Dice {scores[:, 0].mean():.4f} as predicted, "
      f"{scores[:, 1].mean():.4f} with the largest component per label; "
      f"{int((scores[:, 2] > 0).sum())} cases have a label in more than one piece")  # fmt: skip
