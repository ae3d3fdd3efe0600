"""`python -m lightning_seg.predict ckpt_path=CKPT input=FILE_OR_DIR output=DIR`
(`ckpt_path=[A,B,...]`: an ensemble averaging their probabilities) (console: lightning-seg-predict)."""

import logging
import time
from pathlib import Path

import hydra
import nibabel as nib
import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from lightning_seg.config import CONFIG_DIR
from lightning_seg.entry import user_errors
from lightning_seg.errors import MissingFileError
from lightning_seg.inference import Predictor

log = logging.getLogger(__name__)
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def list_images(path: str | Path) -> list[Path]:
    path = Path(path)
    if path.is_file():
        return [path]
    images = sorted(p for p in path.glob("*") if p.name.endswith(NIFTI_SUFFIXES))
    if not images:
        raise MissingFileError(f"{path}: no .nii or .nii.gz images here")
    return images


def predict_files(
    predictor: Predictor, images: list[Path], output: Path, save_probabilities: bool = False
) -> list:
    """Write one label map per image under `output`, with the image's name, shape and affine."""
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for image_path in tqdm(images, desc="predicting", unit="case"):
        labels, probabilities = predictor.predict(image_path)
        original = nib.load(image_path)
        if tuple(labels.shape) != original.shape[:3]:
            raise RuntimeError(
                f"{image_path}: prediction grid {tuple(labels.shape)} != image {original.shape[:3]}"
            )
        header = original.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_data_shape(original.shape[:3])
        target = output / image_path.name
        nib.save(nib.Nifti1Image(labels.numpy(), original.affine, header), target)
        if save_probabilities:
            (output / "probabilities").mkdir(exist_ok=True)
            channels_last = probabilities.permute(1, 2, 3, 0).numpy().astype(np.float32)
            nib.save(
                nib.Nifti1Image(channels_last, original.affine), output / "probabilities" / image_path.name
            )
        written.append(target)
    return written


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="predict")
def main(cfg: DictConfig) -> None:
    with user_errors(cfg):  # a missing file or a bad option: one `error:` line, exit code 2
        predict(cfg)


def predict(cfg: DictConfig) -> None:
    predictor = Predictor(
        cfg.ckpt_path,
        cfg.device,
        cfg.precision,
        cfg.overlap,
        cfg.sw_batch_size,
        cfg.mirror,
        cfg.stitch_on_cpu,
    )
    images = list_images(cfg.input)
    start = time.perf_counter()
    predict_files(predictor, images, Path(cfg.output), cfg.save_probabilities)
    seconds = time.perf_counter() - start
    log.info(
        "%d cases in %.1f s (%.2f cases/s) -> %s", len(images), seconds, len(images) / seconds, cfg.output
    )


if __name__ == "__main__":
    main()
