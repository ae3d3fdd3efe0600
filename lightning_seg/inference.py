"""Segment new volumes with a checkpoint, which alone carries network and preprocessing: the preprocessing,
Gaussian-weighted sliding windows (optionally over mirrored copies), its inverse onto the input's grid."""

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.transforms import Compose, Invertd

from lightning_seg.checkpoint_format import load_checkpoint
from lightning_seg.data.image_size import size_problem
from lightning_seg.data.layout import image_files
from lightning_seg.data.transforms import preprocessing
from lightning_seg.errors import InputError
from lightning_seg.model.module import whole_volume_logits
from lightning_seg.precision import autocast, fast_inference_precision
from lightning_seg.trust import build

log = logging.getLogger(__name__)
STITCH_ON_GPU_MAX_BYTES = 2 * 2**30  # larger probability volumes are stitched in CPU memory
SHARED_TASK_KEYS = ("labels", "in_channels", "orientation", "spacing", "normalization", "crop_foreground")


class Predictor:
    """Predicts whole volumes with a checkpoint of training or several (an ensemble averaging them).
    `overlap` None: the overlap the (first) checkpoint's run validated with, so that `evaluate` on the
    run's validation cases reports its `val/dice`."""

    def __init__(
        self,
        ckpt_path: str | Path | Sequence[str | Path],
        device: str = "auto",
        precision: str | None = None,
        overlap: float | None = None,
        sw_batch_size: int = 4,
        mirror: bool = False,
        stitch_on_cpu: bool | None = None,
        trusted_targets: Sequence[str] = (),
        max_image_gib: float | None = None,
    ) -> None:
        paths = [ckpt_path] if isinstance(ckpt_path, str | Path) else list(ckpt_path)
        if not paths:
            raise InputError("ckpt_path: no checkpoint given")
        auto = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(auto if device == "auto" else device)
        # older formats migrated; newer ones, and code the project does not build or the user trusts, refused
        checkpoints = [load_checkpoint(path, trusted_targets) for path in paths]
        config = checkpoints[0][1]  # preprocessing, precision and mirroring follow the first checkpoint
        self.task = config["task"]
        self.labels = list(self.task["labels"])
        self.nets = []  # (network, its training patch) per checkpoint
        for path, (checkpoint, other) in zip(paths, checkpoints, strict=True):
            if differing := [k for k in SHARED_TASK_KEYS if other["task"].get(k) != self.task.get(k)]:
                raise InputError(
                    f"{path}: cannot join the ensemble, its task differs from {paths[0]}'s in "
                    + ", ".join(f"{k} ({other['task'].get(k)} != {self.task.get(k)})" for k in differing)
                )
            state = {
                k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")
            }
            net = build(other["model"], state, path, "model")
            net.load_state_dict(state)
            self.nets.append((net.to(self.device).eval(), list(other["task"]["patch_size"])))
        precision = precision or config.get("inference_precision") or config["precision"]  # as validate's
        self.precision, why = fast_inference_precision(precision, self.device)
        if why:
            log.warning("%s", why)
        self.stitch_on_cpu, self.max_image_gib = stitch_on_cpu, max_image_gib
        overlap = validated_overlap(config, paths[0]) if overlap is None else overlap
        self.window = dict(overlap=overlap, sw_batch_size=sw_batch_size, sw_device=self.device)
        data = config.get("data", {}) if mirror else {}
        # mirror only along axes the network saw mirrored in training (hippocampus: left-right only)
        dims = [axis + 2 for axis in data.get("flip_axes", range(3))] if data.get("augment") else []
        self.flip_sets = [c for n in range(len(dims) + 1) for c in itertools.combinations(dims, n)]
        self.preprocess = Compose(preprocessing(self.task, keys=("image",)))
        self.invert = Invertd("probabilities", self.preprocess, orig_keys="image", nearest_interp=False)

    @torch.no_grad()
    def predict(self, image_path: str | Path | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(label map, class probabilities) on the grid of the input image (a file, or one per channel)."""
        image_path = str(image_path) if isinstance(image_path, Path) else image_path
        for path in image_files(image_path):  # a header promising too much: refused before decompressing
            if problem := size_problem(path, self.max_image_gib, spacing=self.task.get("spacing")):
                raise InputError(problem)
        try:
            data = self.preprocess({"image": image_path})
        except Exception as err:  # MONAI wraps reader errors in its own types
            raise InputError(f"{image_path}: cannot be read as an image ({err})") from err
        image, wanted = data["image"], self.task["in_channels"]
        if image.shape[0] != wanted:
            raise InputError(f"{image_path}: {image.shape[0]} channel(s), the model was trained on {wanted}")
        x = image.as_tensor()[None]
        too_big = x[0, 0].numel() * len(self.labels) * 4 > STITCH_ON_GPU_MAX_BYTES  # float32 probabilities
        on_cpu = too_big if self.stitch_on_cpu is None else self.stitch_on_cpu
        stitch_device = torch.device("cpu") if on_cpu else self.device
        # one mean over every network's every mirrored copy: the mean of the networks' mirrored means
        passes = []
        for (net, patch), dims in itertools.product(self.nets, self.flip_sets):
            with autocast(self.precision, self.device):
                logits = whole_volume_logits(net, x.flip(dims), patch, device=stitch_device, **self.window)
            probabilities = torch.softmax(logits.float(), dim=1).cpu()
            passes.append(probabilities.flip(dims) if dims else probabilities)
        probabilities = torch.stack(passes).mean(0)
        data["probabilities"] = image.clone().set_array(probabilities[0])  # carries the preprocessing history
        probabilities = self.invert(data)["probabilities"].as_tensor()
        return probabilities.argmax(0).to(torch.uint8), probabilities


def validated_overlap(config: dict, path: str | Path) -> float:
    """The sliding-window overlap the checkpoint's run validated with (`module.sw_overlap`)."""
    overlap = config.get("module", {}).get("sw_overlap")
    if isinstance(overlap, bool) or not isinstance(overlap, int | float) or not 0 <= overlap < 1:
        raise InputError(f"{path}: its module.sw_overlap is {overlap!r}; give overlap=0.5 or so")
    return float(overlap)
