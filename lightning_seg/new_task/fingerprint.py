"""A dataset's fingerprint, read from every case once: per case its geometry, foreground (label > 0)
intensities and labels; over the dataset each channel's foreground intensities, pooled as nnU-Net v2 does."""

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import nibabel as nib
import numpy as np

from lightning_seg.data.layout import image_files, ras_axes

# intensity samples per channel over the whole dataset, shared equally by the cases (nnU-Net: 1e8)
SAMPLES_PER_DATASET = 10**7
SAMPLE_SEED = 1234  # nnU-Net's, so the pooled statistics are drawn the same way
STATS = ("mean", "std", "percentile_00_5", "median", "percentile_99_5", "min", "max")


def channels_of(paths: list[str]) -> tuple[list[np.ndarray], str]:
    """3D float32 arrays, one per channel (nnU-Net's one file each, MSD's in dim 4), and the dtype on disk."""
    arrays, dtypes = [], set()
    for path in paths:
        data = np.asanyarray(nib.load(path).dataobj)
        dtypes.add(str(data.dtype))
        arrays += list(np.moveaxis(data.astype(np.float32).reshape(*data.shape[:3], -1), 3, 0))
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
    box = [np.flatnonzero(nonzero.any(axis=tuple(a for a in range(3) if a != d))) for d in range(3)]
    cropped = np.array([b[-1] - b[0] + 1 for b in box])[order] if nonzero.any() else shape
    foreground = seg > 0
    rng = np.random.default_rng(SAMPLE_SEED)
    values = [data[foreground] for data in channels]
    sampled = [rng.choice(v, samples) if v.size else v for v in values]
    counts = np.bincount(seg.ravel())
    # each label's centre in voxels, then world RAS mm (orientation-independent, for the mirroring rule)
    centres = {str(int(v)): np.argwhere(seg == v).mean(axis=0) for v in np.unique(seg[foreground])}
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
        "foreground_intensities": [summary(v) for v in values],
        "label_voxels": {str(v): int(n) for v, n in enumerate(counts) if n},
        "label_volumes_ml": {str(v): float(n * np.prod(spacing) / 1000) for v, n in enumerate(counts) if n},
        "label_centroids_mm": {
            v: (label_img.affine[:3, :3] @ c + label_img.affine[:3, 3]).tolist() for v, c in centres.items()
        },
        "_samples": sampled,
    }


def summary(values: np.ndarray) -> dict:
    if not values.size:
        return {}
    stats = (values.mean(), values.std(), *np.percentile(values, [0.5, 50, 99.5]), values.min(), values.max())
    return {name: float(s) for name, s in zip(STATS, stats, strict=True)}


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
