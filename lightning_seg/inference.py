"""Segment new volumes with a checkpoint: the checkpoint alone carries network and preprocessing.

Each image goes through the task's preprocessing (reorient, resample, normalize), Gaussian-
weighted sliding windows (optionally averaged over mirrored copies), and the inverse of the
spatial preprocessing, so the label map lands on the input's own grid.
"""

import itertools
import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from hydra.utils import instantiate
from monai.inferers import sliding_window_inference
from monai.transforms import Compose, Invertd

from lightning_seg.checkpoint_format import load_checkpoint
from lightning_seg.data.transforms import preprocessing
from lightning_seg.errors import InputError
from lightning_seg.precision import autocast, fast_inference_precision

log = logging.getLogger(__name__)
STITCH_ON_GPU_MAX_BYTES = 2 * 2**30  # larger probability volumes are stitched in CPU memory


# what every checkpoint of an ensemble must share: the input they read and the labels they write
SHARED_TASK_KEYS = ("labels", "in_channels", "orientation", "spacing", "normalization", "crop_foreground")


def read_checkpoint(path: str | Path) -> tuple[dict, dict]:
    """(run config, network state dict) of a checkpoint written by training."""
    checkpoint, config = load_checkpoint(path)  # older formats migrated, a newer one refused by name
    state = {k.removeprefix("net."): v for k, v in checkpoint["state_dict"].items() if k.startswith("net.")}
    return config, state


class Predictor:
    """Loads a checkpoint written by training, or several (an ensemble: their class probabilities are
    averaged, e.g. the folds of a cross-validation), and predicts whole volumes."""

    def __init__(
        self,
        ckpt_path: str | Path | Sequence[str | Path],
        device: str = "auto",
        precision: str | None = None,
        overlap: float = 0.5,
        sw_batch_size: int = 4,
        mirror: bool = False,
        stitch_on_cpu: bool | None = None,
    ) -> None:
        paths = [ckpt_path] if isinstance(ckpt_path, str | Path) else list(ckpt_path)
        if not paths:
            raise InputError("ckpt_path: no checkpoint given")
        self.device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        checkpoints = [(path, *read_checkpoint(path)) for path in paths]
        # preprocessing, precision and mirroring follow the first checkpoint
        config = self.config = checkpoints[0][1]
        self.task = config["task"]
        for path, other, _ in checkpoints[1:]:
            differing = [k for k in SHARED_TASK_KEYS if other["task"].get(k) != self.task.get(k)]
            if differing:
                raise InputError(
                    f"{path}: cannot join the ensemble, its task differs from {paths[0]}'s in "
                    + ", ".join(f"{k} ({other['task'].get(k)} != {self.task.get(k)})" for k in differing)
                )
        self.nets = []  # (network, its training patch) per checkpoint
        for _, other, state in checkpoints:
            net = instantiate(other["model"])
            net.load_state_dict(state)
            self.nets.append((net.to(self.device).eval(), list(other["task"]["patch_size"])))
        # unless told: what the run validated in (precision=auto's measured choice), else what it trained in
        requested = (
            precision if precision is not None else config.get("inference_precision") or config["precision"]
        )
        self.precision, why = fast_inference_precision(requested, self.device)
        if why:
            log.warning("%s", why)
        self.overlap, self.sw_batch_size, self.stitch_on_cpu = overlap, sw_batch_size, stitch_on_cpu
        data = config.get("data", {})
        trained_flips = data.get("flip_axes", [0, 1, 2]) if data.get("augment", False) else []
        # mirror only along axes the network saw mirrored in training (hippocampus: left-right only)
        self.flip_sets = [()]
        if mirror:
            dims = [axis + 2 for axis in trained_flips]
            self.flip_sets = [c for n in range(len(dims) + 1) for c in itertools.combinations(dims, n)]
        self.preprocess = Compose(preprocessing(self.task, keys=("image",)))
        self.invert = Invertd(
            "probabilities", transform=self.preprocess, orig_keys="image", nearest_interp=False
        )

    @property
    def labels(self) -> list[str]:
        return list(self.task["labels"])

    @torch.no_grad()
    def predict(self, image_path: str | Path | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(label map, class probabilities) on the grid of the input image (a file, or one per channel)."""
        if isinstance(image_path, Path):
            image_path = str(image_path)
        try:
            data = self.preprocess({"image": image_path})
        except Exception as err:  # MONAI wraps reader errors in its own types
            raise InputError(f"{image_path}: cannot be read as an image ({err})") from err
        image = data["image"]
        if image.shape[0] != self.task["in_channels"]:
            raise InputError(
                f"{image_path}: {image.shape[0]} channel(s), the model was trained on "
                f"{self.task['in_channels']}"
            )
        # every network sees every mirrored copy: one mean over all passes is the mean of the
        # networks' mirrored means
        passes = [
            self._probabilities(image[None], dims, net, patch)
            for net, patch in self.nets
            for dims in self.flip_sets
        ]
        probabilities = torch.stack(passes).mean(0)
        data["probabilities"] = image.clone().set_array(probabilities[0])  # carries the preprocessing history
        probabilities = self.invert(data)["probabilities"].as_tensor()
        return probabilities.argmax(0).to(torch.uint8), probabilities

    def _probabilities(
        self, image: torch.Tensor, flip_dims: tuple[int, ...], net: torch.nn.Module, patch: list[int]
    ) -> torch.Tensor:
        x = image.as_tensor().flip(flip_dims) if flip_dims else image.as_tensor()
        stitch = self.stitch_on_cpu
        if stitch is None:
            stitch = x[0, 0].numel() * len(self.labels) * 4 > STITCH_ON_GPU_MAX_BYTES
        with autocast(self.precision, self.device):
            logits = sliding_window_inference(
                x,
                roi_size=patch,
                sw_batch_size=self.sw_batch_size,
                predictor=net,
                overlap=self.overlap,
                mode="gaussian",
                sw_device=self.device,
                device=torch.device("cpu") if stitch else self.device,
            )
        probabilities = torch.softmax(logits.float(), dim=1).cpu()
        return probabilities.flip(flip_dims) if flip_dims else probabilities
