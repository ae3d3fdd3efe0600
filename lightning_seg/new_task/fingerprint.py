"""A dataset's fingerprint: what planning a task needs to know, read from every case once.

Per case: shape and voxel spacing in the orientation training resamples in (RAS), the file's own
orientation, the non-zero box and the share of zero voxels, each channel's foreground intensities
(label > 0), the voxel count, volume and centre of each label. Over the dataset: each channel's
foreground intensity percentiles 0.5 / 99.5, mean and std, pooled as nnU-Net v2's fingerprint
pools them (an equal number of samples drawn from every case, with replacement, seed 1234).
"""

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np

from lightning_seg.data.layout import image_files, ras_axes

# intensity samples per channel over the whole dataset, shared equally by the cases (nnU-Net: 1e8)
SAMPLES_PER_DATASET = 10**7
SAMPLE_SEED = 1234  # nnU-Net's, so the pooled statistics are drawn the same way


def channels_of(paths: list[str]) -> tuple[list[np.ndarray], str]:
    """(3D float32 arrays, one per channel, and the dtype on disk): nnU-Net's one file per channel, or
    MSD's channels in dim 4."""
    arrays, dtypes = [], set()
    for path in paths:
        data = np.asanyarray(nib.load(path).dataobj)
        dtypes.add(str(data.dtype))
        data = data.astype(np.float32)
        arrays += [data] if data.ndim == 3 else [data[..., c] for c in range(data.shape[3])]
    return arrays, "/".join(sorted(dtypes))


def case_fingerprint(case: Mapping, samples: int) -> dict:
    label_img = nib.load(case["label"])
    seg = np.asanyarray(label_img.dataobj)
    seg = (seg[..., 0] if seg.ndim == 4 else seg).astype(np.int64)
    channels, dtype = channels_of(image_files(case["image"]))
    order = ras_axes(label_img)
    shape = np.array(seg.shape)[order]
    spacing = np.array(label_img.header.get_zooms()[:3], dtype=float)[order]
    nonzero = np.any(np.stack(channels) != 0, axis=0)
    if nonzero.any():
        box = [np.flatnonzero(nonzero.any(axis=tuple(a for a in range(3) if a != d))) for d in range(3)]
        cropped = np.array([b[-1] - b[0] + 1 for b in box])[order]
    else:
        cropped = shape
    foreground = seg > 0
    rng = np.random.default_rng(SAMPLE_SEED)
    intensities, sampled = [], []
    for data in channels:
        values = data[foreground]
        sampled.append(rng.choice(values, samples) if values.size else values)
        intensities.append(summary(values))
    counts = np.bincount(seg.ravel())
    return {
        "label": case["label"],
        "image": case["image"],
        "shape": shape.tolist(),
        "spacing": spacing.tolist(),
        "orientation": "".join(nib.aff2axcodes(label_img.affine)),
        "shape_after_nonzero_crop": cropped.tolist(),
        "relative_size_after_crop": float(np.prod(cropped) / np.prod(shape)),
        "zero_share": float(1 - nonzero.mean()),
        "intensity_dtype": dtype,
        "foreground_intensities": intensities,
        "label_voxels": {str(v): int(n) for v, n in enumerate(counts) if n},
        "label_volumes_ml": {str(v): float(n * np.prod(spacing) / 1000) for v, n in enumerate(counts) if n},
        "label_centroids_mm": label_centroids(seg, label_img.affine),
        "_samples": sampled,
    }


def label_centroids(seg: np.ndarray, affine: np.ndarray) -> dict[str, list[float]]:
    """Each foreground label's centre in world RAS mm (orientation-independent, for the mirroring rule)."""
    centres = {}
    for value in np.unique(seg[seg > 0]):
        voxel = np.argwhere(seg == value).mean(axis=0)
        centres[str(int(value))] = (affine[:3, :3] @ voxel + affine[:3, 3]).tolist()
    return centres


def summary(values: np.ndarray) -> dict:
    if not values.size:
        return {}
    low, median, high = np.percentile(values, [0.5, 50, 99.5])
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "percentile_00_5": float(low),
        "median": float(median),
        "percentile_99_5": float(high),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def fingerprint(cases: list[Mapping], workers: int = 2) -> dict:
    """Every case's fingerprint and the dataset's pooled statistics."""
    samples = max(1000, SAMPLES_PER_DATASET // len(cases))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        per_case = list(pool.map(lambda case: case_fingerprint(case, samples), cases))
    pooled = [np.concatenate(s) for s in zip(*(c.pop("_samples") for c in per_case), strict=True)]
    spacings = np.array([c["spacing"] for c in per_case])
    return {
        "num_cases": len(per_case),
        "median_spacing": np.median(spacings, axis=0).tolist(),
        "spacing_min": spacings.min(axis=0).tolist(),
        "spacing_max": spacings.max(axis=0).tolist(),
        "median_shape": np.median([c["shape"] for c in per_case], axis=0).tolist(),
        "median_relative_size_after_crop": float(
            np.median([c["relative_size_after_crop"] for c in per_case])
        ),
        "median_zero_share": float(np.median([c["zero_share"] for c in per_case])),
        "foreground_intensities": [summary(values) for values in pooled],
        "orientations": sorted({c["orientation"] for c in per_case}),
        "cases": per_case,
    }
