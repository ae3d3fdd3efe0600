"""Images too big to load, refused from their header. A NIfTI header says how many voxels follow before a
byte of them is decompressed, and gzip packs zeros about 1000:1: a 30 GiB volume fits in a few MB. The
dataset check, predict and lightning-seg-new-task ask here before they read an image's voxels."""

import math
import os
from collections.abc import Sequence

import nibabel as nib

# 4 GiB of float32 (about 1.07e9 voxels): 4x the largest MSD image (Task03_Liver, 512 x 512 x 987 float32,
# 0.96 GiB); preprocessing holds a few copies of one, which a workstation still fits
MAX_IMAGE_GIB = 4.0


def size_problem(
    path: str | os.PathLike,
    max_gib: float | None = None,
    key: str = "max_image_gib",
    spacing: Sequence[float] | None = None,
) -> str | None:
    """What is wrong with the size `path`'s header promises (in memory: float32 or wider), also once
    resampled to `spacing` (a checkpoint's: predict resamples first), naming the setting `key` that raises
    the limit; None if it fits or the header is unreadable (the reader says so)."""
    limit = MAX_IMAGE_GIB if max_gib is None else float(max_gib)
    try:
        header = nib.load(path).header  # the header alone: the voxels stay on disk, compressed
        shape, itemsize, zooms = header.get_data_shape(), header.get_data_dtype().itemsize, header.get_zooms()
    except Exception:  # nibabel raises many types for foreign files
        return None
    voxels = math.prod(shape)
    promised = f"{' x '.join(map(str, shape))} = {voxels:,} voxels"
    if spacing and all(z > 0 for z in zooms[:3]) and all(s > 0 for s in spacing):
        resampled = round(voxels * math.prod(zooms[:3]) / math.prod(spacing))
        promised += f", {resampled:,} once resampled to the spacing {list(spacing)} mm"
        voxels = max(voxels, resampled)
    gib = voxels * max(itemsize, 4) / 2**30
    if gib <= limit:
        return None
    return (
        f"{path}: its header promises {promised} ({gib:.1f} GiB in memory), over the {limit:g} GiB limit "
        f"({key}); refused before reading it"
    )
