"""Checks, before training, that every case of a task folder (either layout) is readable and fits the
task config, naming the file of each problem. Passed cases are remembered (by path, size and mtime),
so later runs load only the files that changed."""

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.openers import ImageOpener

from lightning_seg.data import layout
from lightning_seg.data.image_size import size_problem
from lightning_seg.data.layout import DatasetError
from lightning_seg.run_dir import write_atomic

# mm: headers written by different tools differ by rounding; a real mismatch is far larger
AFFINE_RTOL, AFFINE_ATOL = 1e-3, 1e-2
# voxel-to-world matrices this ill-conditioned map several voxels to one point (real anisotropy is < 100)
MAX_AFFINE_CONDITION = 1e6
LISTED = 20  # problems a DatasetError lists; the rest are counted


def check_dataset(
    task_dir: str | os.PathLike,
    labels: list[str],
    in_channels: int,
    cache_dir: str | os.PathLike | None = None,
    workers: int = 2,
    max_image_gib: float | None = None,
    allow_outside_paths: bool = False,
) -> list[dict[str, str]]:
    """Check a task folder against the task config; return its cases or raise DatasetError. An image whose
    header promises more than `max_image_gib` is refused unread (`image_size`)."""
    task_dir = Path(task_dir)
    meta = layout.read_dataset_json(task_dir)
    where = task_dir / "dataset.json"
    declared = layout.declared_labels(meta, where)
    if declared is not None and len(declared[0]) != len(labels):
        raise DatasetError(
            f"{where}: declares {len(declared[0])} labels {declared[0]}, "
            f"the task config expects {len(labels)} {list(labels)}"
        )
    channels = layout.declared_channels(meta)
    if channels is not None and len(channels) != in_channels:
        raise DatasetError(
            f"{where}: declares {len(channels)} input channels {channels}, "
            f"the task config expects in_channels={in_channels}"
        )
    cases = layout.read_datalist(task_dir, allow_outside_paths)
    missing = [p for case in cases for p in case_files(case) if not Path(p).is_file()]
    complete = [case for case in cases if all(Path(p).is_file() for p in case_files(case))]
    memo, memo_path = {}, None
    if cache_dir is not None:
        key = hashlib.sha1(f"{task_dir.resolve()}|{len(labels)}|{in_channels}".encode()).hexdigest()[:16]
        memo_path = Path(cache_dir) / "checked" / f"{task_dir.name}-{key}.json"
        with contextlib.suppress(OSError, json.JSONDecodeError):
            memo = json.loads(memo_path.read_text())
    todo = [case for case in complete if memo.get(case["label"]) != case_stamp(case)]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(pool.map(lambda c: check_case(c, len(labels), in_channels, max_image_gib), todo))
    passed = [case for case, problem in zip(todo, results, strict=True) if problem is None]
    if memo_path is not None and passed:  # remembered even when other cases fail: a rerun reads only those
        memo.update({case["label"]: case_stamp(case) for case in passed})
        write_atomic(memo_path, json.dumps(memo))  # a crash never leaves a half-written memo
    problems = [problem for problem in results if problem]
    if missing or problems:  # every problem at once: one fix-and-rerun round, not one per file
        heads = [f"{len(missing)} file(s) listed in {where} do not exist"] if missing else []
        heads += [f"{len(problems)} broken case(s) in {task_dir}"] if problems else []
        lines = [f"{p}: missing" for p in missing] + problems
        more = [f"... and {len(lines) - LISTED} more"] if len(lines) > LISTED else []
        raise DatasetError("\n  ".join([", ".join(heads) + ":", *lines[:LISTED], *more]))
    return cases


def case_files(case: Mapping) -> list[str]:
    return [*layout.image_files(case["image"]), case["label"]]


def check_case(
    case: Mapping, num_labels: int, in_channels: int, max_image_gib: float | None = None
) -> str | None:
    """Load one case; return what is wrong with it (naming the file), or None."""
    loaded = []
    for path in case_files(case):
        if problem := size_problem(path, max_image_gib, "data.max_image_gib"):
            return problem
        try:
            img = nib.load(path)
            loaded.append((path, img, np.asanyarray(img.dataobj)))
        except Exception as err:  # nibabel raises many types for truncated or foreign files
            return _unreadable(path, err)
    *channels, (label_path, label, label_data) = loaded
    image_path, image, image_data = channels[0]
    if label_data.ndim == 4 and label_data.shape[3] == 1:  # a trailing singleton axis, as some tools write
        label_data = label_data[..., 0]
    if problem := _channel_problem(channels, in_channels):
        return problem
    if label_data.ndim != 3:
        return f"{label_path}: shape {label_data.shape}, a label map must be 3D"
    if image_data.shape[:3] != label_data.shape:
        return f"{label_path}: shape {label_data.shape} differs from its image's {image_data.shape[:3]}"
    if problem := singular_affine(image_path, image) or singular_affine(label_path, label):
        return problem
    if not np.allclose(image.affine, label.affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL):
        diff = float(np.abs(image.affine - label.affine).max())
        return f"{label_path}: affine differs from its image's (max difference {diff:.4g})"
    for path, _, data in channels:
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            return f"{path}: contains NaN or infinite values"
    values = np.unique(label_data)
    fractional = values[values != np.round(values)]  # NaN included
    if fractional.size:
        return (
            f"{label_path}: non-integer label values {fractional[:5].tolist()}; a label map holds class "
            f"indices 0..{num_labels - 1} (was it resampled with linear instead of nearest interpolation?)"
        )
    bad = values[(values < 0) | (values >= num_labels)]
    if bad.size:
        return f"{label_path}: label values {bad[:5].tolist()} outside the task's 0..{num_labels - 1}"
    return None


def _channel_problem(channels: list[tuple], in_channels: int) -> str | None:
    """What is wrong with a case's (path, image, data) channel files, or None."""
    image_path, image, image_data = channels[0]
    if len(channels) == 1:  # MSD: one file, 3D or channels in dim 4
        count = 1 if image_data.ndim == 3 else image_data.shape[3] if image_data.ndim == 4 else None
        if count != in_channels:
            shape = image_data.shape
            return f"{image_path}: shape {shape}, expected 3D with {in_channels} channel(s) in dim 4"
        return None
    if len(channels) != in_channels:  # nnU-Net: one 3D file per channel, on one grid
        return f"{image_path}: {len(channels)} channel files, the task config expects {in_channels}"
    for path, img, data in channels:
        if data.ndim != 3:
            return f"{path}: shape {data.shape}, a channel file must be 3D"
        same_grid = np.allclose(img.affine, image.affine, rtol=AFFINE_RTOL, atol=AFFINE_ATOL)
        if data.shape != image_data.shape or not same_grid:
            return f"{path}: shape or affine differs from channel 0's ({image_path})"
    return None


def singular_affine(path: str, img: nib.spatialimages.SpatialImage) -> str | None:
    """What is wrong with a header that gives no usable voxel-to-world mapping, or None. nibabel
    replaces a zero voxel size by 1 mm on load: without sform/qform the header is read again unchecked,
    so an invented spacing is not resampled silently."""
    matrix = np.asarray(img.affine, dtype=float)[:3, :3]
    if not np.isfinite(matrix).all() or np.linalg.cond(matrix) > MAX_AFFINE_CONDITION:
        return (
            f"{path}: singular affine {np.round(matrix, 4).tolist()} (no voxel-to-world mapping); "
            "fix the header's sform/qform with the tool that wrote the file"
        )
    header = img.header
    if not isinstance(header, nib.Nifti1Header) or header["sform_code"] or header["qform_code"]:
        return None  # not NIfTI, or the affine comes from an sform/qform, checked above
    try:
        with ImageOpener(path) as fileobj:
            zooms = type(header).from_fileobj(fileobj, check=False).get_zooms()[:3]
    except Exception:  # unreadable headers were reported by nib.load already
        return None
    if any(not np.isfinite(z) or z == 0 for z in zooms):  # nibabel takes the absolute value of negative ones
        return (
            f"{path}: singular affine: voxel size {[float(z) for z in zooms]} and no sform/qform "
            "(codes 0), so the spacing is unknown; set the voxel size (pixdim) or an sform in the header"
        )
    return None


def _unreadable(path: str, err: Exception) -> str:
    reason = " ".join(str(err).split())  # one line: nibabel's messages can hold line breaks
    return f"{path}: cannot be read as NIfTI ({type(err).__name__}: {reason}); copy or export it again"


def case_stamp(case: Mapping) -> list[int]:
    """Size and modification time of each file of a case: what says it changed."""
    return [n for p in case_files(case) for n in (os.stat(p).st_size, os.stat(p).st_mtime_ns)]
