"""Small phantom datasets as real NIfTI files, in MSD or nnU-Net v2 raw layout: a body ellipsoid
holding one ellipsoid "organ" of distinct intensity per foreground label, times a smooth bias field,
plus Gaussian noise, drawn from a per-case seed (the same settings always write the same files)."""

import json
from pathlib import Path

import nibabel as nib
import numpy as np

from lightning_seg.run_dir import write_json

ORGAN_INTENSITIES = (2.0, 3.2, 1.2, 4.0)  # body is 1.0; one value per foreground label


def write_synthetic_msd(
    task_dir: str | Path,
    num_cases: int = 24,
    shape: tuple[int, int, int] = (64, 64, 48),
    spacing: tuple[float, float, float] = (1.5, 1.5, 2.0),
    num_labels: int = 3,
    seed: int = 0,
) -> Path:
    """Write `num_cases` image/label pairs plus dataset.json under `task_dir`."""
    if not 2 <= num_labels <= len(ORGAN_INTENSITIES) + 1:
        raise ValueError(f"num_labels must be in 2..{len(ORGAN_INTENSITIES) + 1}, got {num_labels}")
    task_dir = Path(task_dir)
    (task_dir / "imagesTr").mkdir(parents=True, exist_ok=True)
    (task_dir / "labelsTr").mkdir(parents=True, exist_ok=True)
    affine = np.diag([*spacing, 1.0])
    training = []
    for case in range(num_cases):
        image, label = synthetic_case(shape, num_labels, np.random.default_rng([seed, case]))
        name = f"synthetic_{case:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image, affine), task_dir / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label, affine), task_dir / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "name": "Synthetic",
        "description": "Phantom ellipsoid organs with bias field and noise (lightning_seg.data.synthetic)",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", **{str(i): f"organ_{chr(96 + i)}" for i in range(1, num_labels)}},
        "numTraining": num_cases,
        "numTest": 0,
        "training": training,
        "test": [],
    }
    write_json(task_dir / "dataset.json", meta)  # last, and whole: its presence says the task is complete
    return task_dir


def write_synthetic_nnunet(
    folder: str | Path,
    geometry: list[tuple[tuple[int, int, int], tuple[float, float, float]]],
    channels: dict[str, str],
    labels: dict,
    num_labels: int = 3,
    ct: bool = False,
    dtype: str = "float32",
) -> Path:
    """An nnU-Net v2 raw folder (`imagesTr/<case>_<channel>.nii.gz`, `labelsTr/`, `dataset.json`) with
    one phantom per (shape, spacing) of `geometry`; channel c is the phantom times c + 1. `ct`: HU images,
    the foreground of case i all 40 + 10 i HU, the body 0 and air -1000 around it (known statistics)."""
    folder = Path(folder)
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    for i, (shape, spacing) in enumerate(geometry):
        image, label = synthetic_case(shape, num_labels, np.random.default_rng(i))
        affine = np.diag([*spacing, 1.0])
        if ct:
            image = np.where(label > 0, 40 + 10 * i, np.where(image > 0.5, 0, -1000))
        for c in range(len(channels)):
            data = (image if ct else image * (1 + c) * (100 if dtype.startswith("int") else 1)).astype(dtype)
            nib.save(nib.Nifti1Image(data, affine), folder / "imagesTr" / f"case{i:02d}_{c:04d}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / "labelsTr" / f"case{i:02d}.nii.gz")
    meta = dict(channel_names=channels, labels=labels, numTraining=len(geometry), file_ending=".nii.gz")
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))
    return folder


def synthetic_case(shape, num_labels: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One phantom (float32 image, uint8 label) of the given shape."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"), axis=-1)
    body = _ellipsoid(grid, rng.uniform(-0.05, 0.05, 3), rng.uniform(0.75, 0.9, 3))
    image = body.astype(np.float32)
    label = np.zeros(shape, np.uint8)
    for value in range(1, num_labels):
        # organs sit on alternate sides of the body so they rarely overlap
        side = 1.0 if value % 2 else -1.0
        centre = np.array([side * rng.uniform(0.2, 0.4), rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3)])
        organ = _ellipsoid(grid, centre, rng.uniform(0.12, 0.28, 3)) & body
        image[organ] = ORGAN_INTENSITIES[value - 1]
        label[organ] = value
    bias = np.exp(grid @ rng.uniform(-0.25, 0.25, 3)).astype(np.float32)  # smooth, like MRI shading
    noise = rng.normal(0.0, 0.35, shape).astype(np.float32)
    return (image * bias + noise * body).astype(np.float32), label


def _ellipsoid(grid: np.ndarray, centre, radii) -> np.ndarray:
    return (((grid - centre) / radii) ** 2).sum(-1) <= 1.0
