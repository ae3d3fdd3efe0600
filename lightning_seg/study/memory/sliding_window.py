"""Peak GPU memory of MONAI's sliding-window inference on a whole volume, validation and `predict`: what
stays on the device through the loop, plus one window batch's no-grad forward (from a fake-tensor run)
and the training step's cuDNN allowance. Overlap changes the number of windows, not the memory."""

import math
from contextlib import nullcontext
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch._subclasses.fake_tensor import FakeTensorMode

from lightning_seg.data.layout import image_files, ras_axes, read_datalist
from lightning_seg.precision import autocast_dtype
from lightning_seg.study.memory.allocator import AllocatorModel, allocator_bytes
from lightning_seg.study.memory.cuda_autocast import CudaAutocast
from lightning_seg.study.memory.step import CUDA, GIB, workspace_allowance


def resampled_shape(shape, spacing, target) -> list[int]:
    """Voxels per axis after resampling from `spacing` to the task's `target` spacing (mm)."""
    return [max(1, round(n * s / t)) for n, s, t in zip(shape, spacing, target, strict=True)]


def largest_volume(cfg: DictConfig) -> tuple[list[int] | None, str]:
    """The largest training image of the task after resampling (voxels per axis, in the task's
    orientation), read from NIfTI headers only; or None and why not."""
    target = [float(t) for t in cfg.task.spacing]
    if synthetic := cfg.task.get("synthetic"):  # the phantom generator's settings say it: no data to write
        shape = resampled_shape(synthetic.shape, synthetic.spacing, target)
        return shape, f"synthetic task: {synthetic.num_cases} cases of {list(synthetic.shape)} voxels"
    task_dir = Path(str(cfg.data.task_dir))
    if not (task_dir / "dataset.json").is_file():
        return None, f"{task_dir / 'dataset.json'} not found (set paths.data_dir, or plan.volume=[x,y,z])"
    cases = read_datalist(task_dir, cfg.data.get("allow_outside_paths", False))
    sizes = {}  # voxels per axis by image path
    for case in cases:
        path = Path(image_files(case["image"])[0])
        if not path.is_file():
            continue
        header = nib.load(str(path))  # reads the header; the voxels stay on disk
        order = ras_axes(header)
        shape, spacing = np.array(header.shape[:3])[order], np.array(header.header.get_zooms()[:3])[order]
        sizes[path] = resampled_shape(shape.tolist(), spacing.tolist(), target)
    if not sizes:
        return None, f"no readable training image listed in {task_dir / 'dataset.json'}"
    path = max(sizes, key=lambda p: math.prod(sizes[p]))
    return sizes[path], f"largest of {len(cases)} training images: {path.name}"


def window_forward_bytes(cfg: DictConfig, windows: int) -> tuple[int, int]:
    """(peak bytes above the weights and the window batch, bytes of the weights) of one no-grad
    forward pass of `windows` windows in eval mode, under the config's precision."""
    dtype = autocast_dtype(cfg.precision, CUDA)
    with FakeTensorMode():
        net = instantiate(cfg.model).eval()
        with AllocatorModel() as mem, torch.no_grad():
            mem.track([*net.parameters(), *net.buffers()], "weights")
            window = torch.randn(windows, int(cfg.task.in_channels), *map(int, cfg.task.patch_size))
            mem.track(window, "input")
            base = mem.current
            with CudaAutocast(dtype) if dtype is not None else nullcontext():
                net(window)
    return mem.peak - base, sum(allocator_bytes(p.numel() * p.element_size()) for p in net.parameters())


def sliding_window_memory(cfg: DictConfig, volume: list[int], sw_batch_size: int) -> dict:
    """Peak device bytes of validation and of `predict` (GPU and CPU stitching) on one volume."""
    patch = [int(n) for n in cfg.task.patch_size]
    labels, channels = len(cfg.task.labels), int(cfg.task.in_channels)
    padded = [max(v, p) for v, p in zip(volume, patch, strict=True)]  # MONAI pads a smaller volume
    voxels, padded_voxels = math.prod(volume), math.prod(padded)

    def size(count: int, itemsize: int) -> int:
        return allocator_bytes(count * itemsize)

    image = size(channels * voxels, 4) + (size(channels * padded_voxels, 4) if padded != volume else 0)
    forward, weights = window_forward_bytes(cfg, sw_batch_size)
    # through the loop: the weights, the image, one window's Gaussian importance map, the window batch
    loop = weights + image + size(math.prod(patch), 4) + size(sw_batch_size * channels * math.prod(patch), 4)
    loop += forward + workspace_allowance(cfg)  # the convolutions' cuDNN workspaces
    output, count = size(labels * padded_voxels, 4), size(padded_voxels, 4)
    # scoring: argmax, int64 labels, torchmetrics' one-hot encodings and their product (8 bytes a voxel)
    index, onehot, label = size(voxels, 8), size(labels * voxels, 8), size(voxels, 4)
    # validation: the label rides along on the device; stitching is on the device
    validation_loop = loop + label + output + count
    validation_score = weights + image + label + output + 2 * index + 3 * onehot
    predict_gpu = max(loop + output + count, weights + image + 2 * output)  # + softmax of the logits
    parts = {
        "weights": weights,
        "image": image,
        "window_batch_forward": forward,
        "cudnn_workspace": workspace_allowance(cfg),
        "output_buffer": output,
        "count_map": count,
        "validation_scoring": label + 2 * index + 3 * onehot,
    }
    return {
        "volume": list(volume),
        "sw_batch_size": sw_batch_size,
        "precision": str(cfg.precision),
        "validation_peak_gib": round(max(validation_loop, validation_score) / GIB, 4),
        "predict_gpu_stitching_peak_gib": round(predict_gpu / GIB, 4),
        "predict_cpu_stitching_peak_gib": round(loop / GIB, 4),
        "parts_gib": {k: round(v / GIB, 4) for k, v in parts.items()},
    }
