"""`python -m lightning_seg.predict ckpt_path=CKPT input=FILE_OR_DIR output=DIR` (lightning-seg-predict):
`ckpt_path=[A,B,...]` is an ensemble averaging their probabilities. A folder in nnU-Net's naming (one file
per channel: `<case>_0000.nii.gz`, ...) is read as one image per case, written as `<case>.nii.gz`."""

import logging
import time
from pathlib import Path

import hydra
import nibabel as nib
import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from lightning_seg.config import CONFIG_DIR
from lightning_seg.data.layout import NIFTI_ENDINGS, channel_files, image_files, prediction_name
from lightning_seg.entry import user_errors
from lightning_seg.errors import MissingFileError
from lightning_seg.inference import Predictor
from lightning_seg.trust import named_by

log = logging.getLogger(__name__)


def list_images(path: str | Path) -> list[Path]:
    """The NIfTI file `path`, or those in the folder `path`."""
    path = Path(path)
    if path.is_file():
        return [path]
    images = sorted(p for p in path.glob("[!.]*") if p.name.endswith(NIFTI_ENDINGS))  # not macOS' ._ files
    if not images:
        raise MissingFileError(f"{path}: no .nii or .nii.gz images here")
    return images


def list_inputs(path: str | Path) -> list[str | list[str]]:
    """Images to predict: a file, or a folder's files, one list per case if all are nnU-Net channel files."""
    files = list_images(path)
    cases = channel_files(Path(path), next(e for e in NIFTI_ENDINGS if files[0].name.endswith(e)))
    counts = {tuple(sorted(channels)) for channels in cases.values()}  # all alike, 0..C-1: one list per case
    if sum(map(len, cases.values())) == len(files) and counts == {tuple(range(len(min(counts))))}:
        return [[str(p) for _, p in sorted(channels.items())] for _, channels in sorted(cases.items())]
    return [str(p) for p in files]


def predict_files(
    predictor: Predictor, images: list[str | list[str]], output: Path, save_probabilities: bool = False
) -> list:
    """Write one label map per image under `output`, named as its label file, on the image's grid."""
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for image in tqdm(images, desc="predicting", unit="case"):
        labels, probabilities = predictor.predict(image)
        original = nib.load(image_path := image_files(image)[0])
        if tuple(labels.shape) != original.shape[:3]:
            raise RuntimeError(
                f"{image_path}: prediction grid {tuple(labels.shape)} != image {original.shape[:3]}"
            )
        target = output / prediction_name(image)
        # the image's header (units, description, ...) with the data shape and dtype of the labels
        nib.save(nib.Nifti1Image(labels.numpy(), original.affine, original.header, dtype=np.uint8), target)
        if save_probabilities:
            (output / "probabilities").mkdir(exist_ok=True)
            channels_last = probabilities.permute(1, 2, 3, 0).numpy().astype(np.float32)
            nib.save(nib.Nifti1Image(channels_last, original.affine), output / "probabilities" / target.name)
        written.append(target)
    return written


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    with user_errors(cfg):  # a missing file or a bad option: one `error:` line, exit code 2
        inference = ("device", "precision", "overlap", "sw_batch_size", "mirror", "stitch_on_cpu")
        limits = {"trusted_targets": named_by(cfg), "max_image_gib": cfg.max_image_gib}  # SECURITY.md
        predictor = Predictor(cfg.ckpt_path, **limits, **{name: cfg[name] for name in inference})
        images = list_inputs(cfg.input)
        start = time.perf_counter()
        predict_files(predictor, images, Path(cfg.output), cfg.save_probabilities)
        rate = len(images) / (seconds := time.perf_counter() - start)
        log.info("%d cases in %.1f s (%.2f cases/s) -> %s", len(images), seconds, rate, cfg.output)


if __name__ == "__main__":
    main()
