"""`python -m lightning_seg.predict ckpt_path=CKPT input=FILE_OR_DIR output=DIR`
(`ckpt_path=[A,B,...]`: an ensemble averaging their probabilities) (console: lightning-seg-predict).

A folder in nnU-Net's naming (`<case>_0000.nii.gz`, `<case>_0001.nii.gz`, ...: one file per channel)
is read as one image per case, written as `<case>.nii.gz`; any other NIfTI file is one image."""

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

log = logging.getLogger(__name__)


def list_images(path: str | Path) -> list[Path]:
    """The NIfTI file `path`, or those in the folder `path`."""
    path = Path(path)
    if path.is_file():
        return [path]
    # not macOS' hidden ._ companions, as the MSD archives hold them
    images = sorted(
        p for p in path.glob("*") if p.name.endswith(NIFTI_ENDINGS) and not p.name.startswith(".")
    )
    if not images:
        raise MissingFileError(f"{path}: no .nii or .nii.gz images here")
    return images


def list_inputs(path: str | Path) -> list[str | list[str]]:
    """The images to predict: a file, or a folder's files; a folder whose every file is nnU-Net's
    `<case>_<channel>` with channels 0..C-1 for every case gives one list of C files per case."""
    files = list_images(path)
    ending = next(e for e in NIFTI_ENDINGS if files[0].name.endswith(e))
    cases = channel_files(Path(path), ending) if Path(path).is_dir() else {}
    grouped = sum(len(channels) for channels in cases.values()) == len(files)
    counts = {tuple(sorted(channels)) for channels in cases.values()}
    if grouped and len(counts) == 1 and next(iter(counts)) == tuple(range(len(next(iter(counts))))):
        return [[str(p) for _, p in sorted(channels.items())] for _, channels in sorted(cases.items())]
    return [str(p) for p in files]


def predict_files(
    predictor: Predictor, images: list[str | list[str]], output: Path, save_probabilities: bool = False
) -> list:
    """Write one label map per image (a file, or one file per channel) under `output`, named as its
    label file would be, with the image's shape and affine."""
    output.mkdir(parents=True, exist_ok=True)
    written = []
    for image in tqdm(images, desc="predicting", unit="case"):
        labels, probabilities = predictor.predict(image)
        image_path = image_files(image)[0]
        original = nib.load(image_path)
        if tuple(labels.shape) != original.shape[:3]:
            raise RuntimeError(
                f"{image_path}: prediction grid {tuple(labels.shape)} != image {original.shape[:3]}"
            )
        header = original.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_data_shape(original.shape[:3])
        target = output / prediction_name(image)
        nib.save(nib.Nifti1Image(labels.numpy(), original.affine, header), target)
        if save_probabilities:
            (output / "probabilities").mkdir(exist_ok=True)
            channels_last = probabilities.permute(1, 2, 3, 0).numpy().astype(np.float32)
            nib.save(nib.Nifti1Image(channels_last, original.affine), output / "probabilities" / target.name)
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
    images = list_inputs(cfg.input)
    start = time.perf_counter()
    predict_files(predictor, images, Path(cfg.output), cfg.save_probabilities)
    seconds = time.perf_counter() - start
    log.info(
        "%d cases in %.1f s (%.2f cases/s) -> %s", len(images), seconds, len(images) / seconds, cfg.output
    )


if __name__ == "__main__":
    main()
