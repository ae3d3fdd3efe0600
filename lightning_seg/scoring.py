"""Per-case segmentation scores (Dice, 95% Hausdorff distance in mm, volumes) and their summary.

What is scored: each foreground label, or, for a task the literature scores by regions (unions of
labels: brain_tumour's whole tumour, tumour core and enhancing tumour, `task.regions`), the regions.
Training's `val/dice` scores the same structures (`structure_masks` builds both).

Empty structures follow the rule training's `val/dice` uses (torchmetrics' DiceScore), as nnU-Net does:
- reference and prediction both empty: no score (NaN), left out of that label's mean, so a label a
  case does not have neither inflates nor lowers the result; a label no case has is left out of the
  foreground mean;
- exactly one of them empty: Dice 0, HD95 = the image diagonal in mm (the worst possible
  distance), so a missed or hallucinated structure is penalised rather than dropped.
"""

import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from monai.metrics import compute_hausdorff_distance

from lightning_seg.errors import ConfigError

Regions = dict[str, list[int]]  # region name -> the label values it unites


def scored_structures(labels: list[str], regions: Regions | None = None) -> Regions:
    """Name -> label values of what is scored: the regions when given, else each foreground label
    (labels[0] is background)."""
    if regions:
        structures = {str(name): [int(v) for v in values] for name, values in regions.items()}
        for name, values in structures.items():
            if not values or not all(1 <= v < len(labels) for v in values):
                raise ConfigError(
                    f"regions: '{name}' unites {values}; a region needs foreground label values 1.."
                    f"{len(labels) - 1} (labels: {', '.join(labels)})"
                )
        return structures
    return {name: [value] for value, name in enumerate(labels[1:], start=1)}


def structure_masks(index_map: torch.Tensor, structures: Regions) -> torch.Tensor:
    """(batch, structures, *spatial) masks of a (batch, *spatial) label map."""
    return torch.stack(
        [
            torch.isin(index_map, torch.tensor(values, device=index_map.device))
            for values in structures.values()
        ],
        dim=1,
    )


def score_case(
    pred: np.ndarray, ref: np.ndarray, spacing, labels: list[str], regions: Regions | None = None
) -> dict[str, float]:
    """Scores of one case for every scored structure (`scored_structures`)."""
    voxel_ml = float(np.prod(spacing)) / 1000.0
    diagonal_mm = float(np.linalg.norm(np.array(ref.shape) * np.array(spacing)))
    scores = {}
    for name, values in scored_structures(labels, regions).items():
        p, r = np.isin(pred, values), np.isin(ref, values)
        n_p, n_r = int(p.sum()), int(r.sum())
        if n_p == 0 and n_r == 0:
            dice = hd95 = float("nan")
        elif n_p == 0 or n_r == 0:
            dice, hd95 = 0.0, diagonal_mm
        else:
            dice = 2.0 * float(np.logical_and(p, r).sum()) / (n_p + n_r)
            with warnings.catch_warnings():
                # MONAI 1.5+ passes its own deprecated get_mask_edges(always_return_as_numpy=...) here
                warnings.filterwarnings("ignore", message=r".*get_mask_edges.always_return_as_numpy")
                hd95 = float(
                    compute_hausdorff_distance(
                        torch.from_numpy(p)[None, None],
                        torch.from_numpy(r)[None, None],
                        percentile=95,
                        spacing=list(map(float, spacing)),
                    )[0, 0]
                )
        scores.update(
            {
                f"dice_{name}": dice,
                f"hd95_{name}": hd95,
                f"pred_ml_{name}": n_p * voxel_ml,
                f"ref_ml_{name}": n_r * voxel_ml,
            }
        )
    return scores


def score_files(
    pairs: list[tuple[Path, Path]], labels: list[str], regions: Regions | None = None
) -> pd.DataFrame:
    """One row per (prediction, reference) pair of NIfTI label maps on the same grid."""
    rows = []
    for pred_path, ref_path in pairs:
        pred_img, ref_img = nib.load(pred_path), nib.load(ref_path)
        if pred_img.shape != ref_img.shape:
            raise ValueError(
                f"{pred_path}: shape {pred_img.shape} differs from the reference's {ref_img.shape} "
                f"({ref_path})"
            )
        if not np.allclose(pred_img.affine, ref_img.affine, atol=1e-3):
            raise ValueError(f"{pred_path}: affine differs from the reference's ({ref_path})")
        pred = np.rint(np.asanyarray(pred_img.dataobj)).astype(np.int64)
        ref = np.rint(np.asanyarray(ref_img.dataobj)).astype(np.int64)
        rows.append(
            {"case": ref_path.name, **score_case(pred, ref, ref_img.header.get_zooms()[:3], labels, regions)}
        )
    return pd.DataFrame(rows)


def summarize(per_case: pd.DataFrame, labels: list[str], regions: Regions | None = None) -> dict:
    """Mean, std, median per scored structure and metric over the cases that score it (`scored`);
    foreground mean over the structures some case scores. No score at all is None (null in JSON).
    `labels` holds the structures (the regions when the task has them: `scored_by`)."""
    summary: dict = {"cases": len(per_case), "scored_by": "regions" if regions else "labels", "labels": {}}
    for name in scored_structures(labels, regions):
        summary["labels"][name] = {"scored": int(per_case[f"dice_{name}"].notna().sum())} | {
            metric: {
                "mean": _number(per_case[f"{metric}_{name}"].mean()),
                "std": _number(per_case[f"{metric}_{name}"].std(ddof=0)),
                "median": _number(per_case[f"{metric}_{name}"].median()),
            }
            for metric in ("dice", "hd95")
        }
    for metric in ("dice", "hd95"):
        means = [s[metric]["mean"] for s in summary["labels"].values() if s[metric]["mean"] is not None]
        summary[f"foreground_mean_{metric}"] = float(np.mean(means)) if means else None
    return summary


def _number(value: float) -> float | None:
    return None if pd.isna(value) else float(value)


def summary_markdown(summary: dict, title: str) -> str:
    kind = "region" if summary.get("scored_by") == "regions" else "label"
    lines = [
        f"# {title}",
        "",
        f"{summary['cases']} cases. Dice and HD95 (mm) per {kind}: mean ± std (median), over the cases "
        f"that have the {kind} in the reference or the prediction (scored).",
        "",
        f"| {kind} | scored | Dice | HD95 (mm) |",
        "| --- | --- | --- | --- |",
    ]
    for name, s in summary["labels"].items():
        d, h = s["dice"], s["hd95"]
        lines.append(
            f"| {name} | {s['scored']} | {_text(d['mean'], '.4f')} ± {_text(d['std'], '.4f')} "
            f"({_text(d['median'], '.4f')}) | {_text(h['mean'], '.2f')} ± {_text(h['std'], '.2f')} "
            f"({_text(h['median'], '.2f')}) |"
        )
    lines.append(
        f"| **foreground mean** | | **{_text(summary['foreground_mean_dice'], '.4f')}** "
        f"| {_text(summary['foreground_mean_hd95'], '.2f')} |"
    )
    return "\n".join(lines) + "\n"


def _text(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
