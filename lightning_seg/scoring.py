"""Per-case segmentation scores (Dice, 95% Hausdorff distance in mm, volumes) and their summary, of each
foreground label or region (`task.regions`: unions of labels), empty ones as training's `val/dice` does."""

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
    """Name -> label values: the regions when given, else each foreground label."""
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
    return torch.stack([torch.isin(index_map, index_map.new_tensor(v)) for v in structures.values()], dim=1)


def score_case(
    pred: np.ndarray, ref: np.ndarray, spacing, labels: list[str], regions: Regions | None = None
) -> dict[str, float]:
    voxel_ml = float(np.prod(spacing)) / 1000.0
    diagonal_mm = float(np.linalg.norm(np.array(ref.shape) * np.array(spacing)))
    scores = {}
    for name, values in scored_structures(labels, regions).items():
        p, r = (torch.from_numpy(np.isin(index_map, values))[None, None] for index_map in (pred, ref))
        n_p, n_r = int(p.sum()), int(r.sum())
        # both empty: NaN, no score, left out of the means; one empty (missed, hallucinated): the worst scores
        if n_p == 0 or n_r == 0:
            dice, hd95 = (float("nan"), float("nan")) if n_p == n_r else (0.0, diagonal_mm)
        else:
            dice = 2.0 * float((p & r).sum()) / (n_p + n_r)
            with warnings.catch_warnings():
                # MONAI 1.5+ passes its own deprecated get_mask_edges(always_return_as_numpy=...) here
                warnings.filterwarnings("ignore", message=r".*get_mask_edges.always_return_as_numpy")
                spacing_mm = list(map(float, spacing))
                hd95 = float(compute_hausdorff_distance(p, r, percentile=95, spacing=spacing_mm)[0, 0])
        scores |= {f"dice_{name}": dice, f"hd95_{name}": hd95}
        scores |= {f"pred_ml_{name}": n_p * voxel_ml, f"ref_ml_{name}": n_r * voxel_ml}
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
        pred, ref = (np.rint(np.asanyarray(img.dataobj)).astype(np.int64) for img in (pred_img, ref_img))
        spacing = ref_img.header.get_zooms()[:3]
        rows.append({"case": ref_path.name, **score_case(pred, ref, spacing, labels, regions)})
    return pd.DataFrame(rows)


def summarize(per_case: pd.DataFrame, labels: list[str], regions: Regions | None = None) -> dict:
    """Mean, std, median per structure and metric over the cases scoring it, foreground mean; NaN: None."""
    summary: dict = {"cases": len(per_case), "scored_by": "regions" if regions else "labels", "labels": {}}
    for name in scored_structures(labels, regions):
        columns = {metric: per_case[f"{metric}_{name}"] for metric in ("dice", "hd95")}
        summary["labels"][name] = {"scored": int(columns["dice"].notna().sum())} | {
            metric: {"mean": _number(c.mean()), "std": _number(c.std(ddof=0)), "median": _number(c.median())}
            for metric, c in columns.items()
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
        f"# {title}\n",
        f"{summary['cases']} cases. Dice and HD95 (mm) per {kind}: mean ± std (median), over the cases "
        f"that have the {kind} in the reference or the prediction (scored).\n",
        f"| {kind} | scored | Dice | HD95 (mm) |",
        "| --- | --- | --- | --- |",
        *(
            f"| {name} | {s['scored']} | {_stats(s['dice'], '.4f')} | {_stats(s['hd95'], '.2f')} |"
            for name, s in summary["labels"].items()
        ),
        f"| **foreground mean** | | **{_text(summary['foreground_mean_dice'], '.4f')}** "
        f"| {_text(summary['foreground_mean_hd95'], '.2f')} |",
    ]
    return "\n".join(lines) + "\n"


def _stats(s: dict, spec: str) -> str:
    return f"{_text(s['mean'], spec)} ± {_text(s['std'], spec)} ({_text(s['median'], spec)})"


def _text(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
