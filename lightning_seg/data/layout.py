"""The two dataset layouts a task folder may have, read into one list of cases.

- MSD: `dataset.json` lists the `training` cases; a multi-channel image is one 4D NIfTI.
- nnU-Net v2 raw: `dataset.json` declares `channel_names`, `labels` (name -> value, a list of values
  for a region), `numTraining` and `file_ending`; `imagesTr/<case>_0000<ending>` holds channel 0 of a
  case (one file per channel), `labelsTr/<case><ending>` its labels.

A case is `{"image": path or [one path per channel, which LoadImaged stacks], "label": path}`, named
by its label file (the case name in both layouts).
"""

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np

from lightning_seg.errors import UserError

NIFTI_ENDINGS = (".nii.gz", ".nii")
CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")  # nnU-Net: <case>_0000


class DatasetError(UserError, ValueError):
    """A task folder that cannot be trained on, naming file and problem; a ValueError for older callers."""


def read_dataset_json(task_dir: Path) -> dict:
    path = Path(task_dir) / "dataset.json"
    if not path.is_file():
        raise DatasetError(
            f"{path}: missing (a task folder holds dataset.json, imagesTr/, labelsTr/: MSD or nnU-Net v2 raw)"
        )
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: expected a JSON object at the top level")
    return meta


def is_nnunet(meta: Mapping) -> bool:
    """nnU-Net v2 raw declares its channels and file ending; MSD lists its cases."""
    return "channel_names" in meta and "training" not in meta


def read_datalist(task_dir, allow_outside_paths: bool = False) -> list[dict]:
    """Every labelled case of a task folder, as absolute paths, in a stable order. A path of dataset.json
    that leaves the folder is refused unless `allow_outside_paths` (a folder from elsewhere is untrusted)."""
    task_dir = Path(task_dir)
    meta = read_dataset_json(task_dir)
    inside = _Inside(task_dir, allow_outside_paths)
    return _nnunet_cases(task_dir, meta, inside) if is_nnunet(meta) else _msd_cases(task_dir, meta, inside)


class _Inside:
    """A dataset.json path, resolved in the task folder; one that leaves it (`..`, absolute) refused.
    Compared as written, symlinks not followed: a link the user made inside the folder is theirs."""

    def __init__(self, task_dir: Path, allowed: bool) -> None:
        self.task_dir, self.allowed = task_dir, allowed
        self.root = Path(os.path.normpath(task_dir.absolute()))

    def __call__(self, entry: str, path: str) -> str:
        if not self.allowed and not Path(os.path.normpath(self.root / path)).is_relative_to(self.root):
            raise DatasetError(
                f"{self.task_dir / 'dataset.json'}: {entry} names {path!r}, outside the task folder; refused "
                "(SECURITY.md). If you trust this folder: data.allow_outside_paths=true"
            )
        return str((self.task_dir / path).resolve())


def _msd_cases(task_dir: Path, meta: Mapping, inside: _Inside) -> list[dict]:
    entries, where = meta.get("training"), task_dir / "dataset.json"
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"{where}: no 'training' list of cases (nor nnU-Net's 'channel_names')")
    cases = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not {"image", "label"} <= entry.keys():
            raise DatasetError(f"{where}: training entry {i} needs 'image' and 'label' keys, got {entry!r}")
        cases.append({key: inside(f"training entry {i} '{key}'", entry[key]) for key in ("image", "label")})
    return cases


def _nnunet_cases(task_dir: Path, meta: Mapping, inside: _Inside) -> list[dict]:
    where, ending = task_dir / "dataset.json", meta.get("file_ending", ".nii.gz")
    if ending not in NIFTI_ENDINGS:
        readable = ", ".join(NIFTI_ENDINGS)
        raise DatasetError(f"{where}: file_ending '{ending}': only NIfTI ({readable}) is read")
    channels = len(meta["channel_names"])
    if isinstance(meta.get("dataset"), Mapping):  # nnU-Net's explicit listing, paths relative to the folder
        cases = [_explicit_case(where, name, entry, inside) for name, entry in meta["dataset"].items()]
    else:
        by_case = channel_files(task_dir / "imagesTr", ending)
        cases = []
        for name, files in sorted(by_case.items()):
            if sorted(files) != list(range(channels)):
                wanted = ", ".join(f"{name}_{c:04d}{ending}" for c in range(channels) if c not in files)
                found = ", ".join(f"{name}_{c:04d}{ending}" for c in sorted(files))
                raise DatasetError(
                    f"{task_dir / 'imagesTr'}: case {name} has {found}, but dataset.json declares "
                    f"{channels} channel(s) (channel_names): "
                    + (f"missing {wanted}" if wanted else "remove the extra channel files")
                )
            label = task_dir / "labelsTr" / f"{name}{ending}"
            cases.append({"image": [str(files[c]) for c in range(channels)], "label": str(label.resolve())})
    if not cases:
        raise DatasetError(f"{task_dir / 'imagesTr'}: no <case>_0000{ending} images")
    declared = meta.get("numTraining")
    if isinstance(declared, int) and declared != len(cases):
        raise DatasetError(
            f"{where}: numTraining is {declared}, but imagesTr/ holds {len(cases)} case(s): "
            "correct numTraining or add the missing cases"
        )
    return cases


def _explicit_case(where: Path, name: str, entry, inside: _Inside) -> dict:
    if not isinstance(entry, Mapping) or not {"images", "label"} <= entry.keys():
        raise DatasetError(f"{where}: dataset entry '{name}' needs 'images' and 'label'")
    images = [inside(f"dataset entry '{name}' images", p) for p in entry["images"]]
    return {"image": images, "label": inside(f"dataset entry '{name}' label", entry["label"])}


def channel_files(folder: Path, ending: str) -> dict[str, dict[int, Path]]:
    """nnU-Net's `<case>_<channel><ending>` files of a folder: {case: {channel: path}}."""
    found: dict[str, dict[int, Path]] = {}
    for path in sorted(folder.glob(f"*{ending}")) if folder.is_dir() else []:
        match = CHANNEL_FILE.match(path.name[: -len(ending)])
        if match and not path.name.startswith("."):  # not macOS' ._ companions, as MSD archives hold them
            found.setdefault(match["case"], {})[int(match["channel"])] = path.resolve()
    return found


def image_files(image: str | os.PathLike | list[str]) -> list[str]:
    """The files of one image: one (MSD) or one per channel (nnU-Net)."""
    return [os.fspath(image)] if isinstance(image, str | os.PathLike) else [str(p) for p in image]


def case_name(case: Mapping) -> str:
    """The name a split records a case by: its label file's name (the same in both layouts)."""
    return Path(case["label"]).name


def declared_labels(
    meta: Mapping, where: Path = Path("dataset.json")
) -> tuple[list[str], dict[str, list[int]] | None] | None:
    """(names by label value, regions or None) that dataset.json declares, or None.
    MSD: {"0": "background", ...}. nnU-Net: {"background": 0, "liver": 1}; a region lists its values
    ({"whole_tumour": [1, 2, 3]}): a value then takes the name of the label that is that value alone,
    else `label_<value>`, and every non-background entry is scored as a region."""
    labels = meta.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        return None
    if not is_nnunet(meta):
        return [name for _, name in sorted(labels.items(), key=lambda item: int(item[0]))], None
    values = {name: [value] if isinstance(value, int) else list(value) for name, value in labels.items()}
    every = sorted({v for vs in values.values() for v in vs} | {0})
    if every != list(range(len(every))):
        raise DatasetError(f"{where}: label values {every} are not consecutive from 0 (as nnU-Net requires)")
    alone = {vs[0]: name for name, vs in values.items() if len(vs) == 1}
    names = [alone.get(v, "background" if v == 0 else f"label_{v}") for v in every]
    has_regions = any(not isinstance(value, int) for value in labels.values())
    regions = {name: vs for name, vs in values.items() if vs != [0]} if has_regions else None
    return names, regions


def declared_channels(meta: Mapping) -> list[str] | None:
    """Channel (modality) names by index: MSD's `modality`, nnU-Net's `channel_names`."""
    channels = meta.get("channel_names") if is_nnunet(meta) else meta.get("modality")
    if not isinstance(channels, Mapping):
        return None
    return [str(name) for _, name in sorted(channels.items(), key=lambda item: int(item[0]))]


def prediction_name(image: str | os.PathLike | list[str]) -> str:
    """The file name of `image`'s prediction: an MSD image's; an nnU-Net case's (less `_0000`)."""
    if isinstance(image, str | os.PathLike):
        return Path(image).name
    first = Path(image[0]).name
    ending = next((e for e in NIFTI_ENDINGS if first.endswith(e)), "")
    match = CHANNEL_FILE.match(first[: len(first) - len(ending)])
    return (match["case"] + ending) if match else first


def ras_axes(img: nib.spatialimages.SpatialImage) -> np.ndarray:
    """For each RAS axis, the voxel axis that runs along it (training reorients to RAS)."""
    return np.argsort(nib.orientations.io_orientation(img.affine)[:, 0])
