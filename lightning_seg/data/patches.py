"""Datasets over the preprocessed store: random class-aware training patches, whole validation volumes.

Hand-written because MONAI's crop transforms take the whole volume in memory: here a patch is cut from a
memory-mapped case (only its pages are read) or from one held in memory or on the GPU, by the same code.
MONAI still picks the patch centres (generate_label_classes_crop_centers) and augments the patches."""

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Compose, Randomizable
from monai.transforms.utils import generate_label_classes_crop_centers
from torch.utils.data import Dataset

from lightning_seg.data.store import Store, StoredCase

HOLD = ("memory", "disk", "gpu")  # where training's cases are read from: see PatchDataset


class PatchDataset(Randomizable, Dataset):
    """`num_samples` random patches per case, their centres drawn by class `ratios` from the stored
    candidates, each then through `transform`. `hold`: "disk" maps the case for each draw (a process holds
    no volume; the OS page cache keeps hot cases once for every process), "memory" loads every case once,
    "gpu" onto `device` (the patches are cut and augmented there)."""

    def __init__(
        self,
        cases: Sequence[StoredCase],
        patch_size: Sequence[int],
        num_samples: int,
        ratios: Sequence[float],
        transform: Compose,
        hold: str = "disk",
        device: torch.device | None = None,
    ) -> None:
        self.cases, self.patch_size, self.num_samples = list(cases), tuple(patch_size), num_samples
        self.ratios, self.transform, self.hold = list(ratios), transform, hold
        self.centres = [case.centres() for case in self.cases]  # small: a bounded count per class
        self.held = None
        if hold != "disk":
            to = device if hold == "gpu" else None
            self.held = [[torch.from_numpy(a).to(to) for a in case.arrays(mmap=False)] for case in self.cases]
        # seeded from numpy's global state (seed_everything), the augmentation too (MONAI's transforms
        # otherwise share one unseeded state); DataLoader workers reseed both (MONAI's set_rnd)
        self.set_random_state(seed=int(np.random.randint(2**31)))
        self.transform.set_random_state(seed=int(np.random.randint(2**31)))

    def __len__(self) -> int:
        return len(self.cases)

    def randomize(self, data=None) -> None:  # Randomizable's interface; the draws happen in __getitem__
        pass

    def __getitem__(self, index: int) -> list[dict]:
        image, label = self.held[index] if self.held is not None else self.cases[index].arrays(mmap=True)
        indices, box_start, box_end = self.centres[index]
        box = box_end - box_start
        centres = generate_label_classes_crop_centers(
            self.patch_size,
            self.num_samples,
            box,
            indices,
            self.ratios,
            self.R,
            allow_smaller=True,
            warn=False,
        )
        # a box narrower than the patch is centred in it, as padding it to the patch would
        starts = [
            [
                lo + (c - k // 2 if n >= k else -((k - n) // 2))
                for lo, c, n, k in zip(box_start, centre, box, self.patch_size, strict=True)
            ]
            for centre in centres
        ]
        return [
            self.transform(
                {
                    "image": cut(image, start, self.patch_size),
                    "label": cut(label[None], start, self.patch_size),
                }
            )
            for start in starts
        ]


class VolumeDataset(Dataset):
    """Whole stored volumes of `data` (case dicts, as MONAI's datasets name them: callbacks read the case
    names there), read one at a time (validation)."""

    def __init__(self, store: Store, data: Sequence[Mapping]) -> None:
        self.data, self.cases = list(data), [store.case(case) for case in data]

    def __len__(self) -> int:
        return len(self.cases)

    def __getitem__(self, index: int) -> Mapping[str, torch.Tensor]:
        image, label = self.cases[index].arrays(mmap=False)
        return {"image": torch.from_numpy(image), "label": torch.from_numpy(label[None].astype(np.float32))}


def cut(array: np.ndarray | torch.Tensor, start: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """The float32 (C, *size) block of a (C, X, Y, Z) array at `start`, zero where it leaves the array.
    Slicing a memory map reads only that block's pages."""
    shape = array.shape[1:]
    lo = [max(0, s) for s in start]
    hi = [min(n, s + k) for n, s, k in zip(shape, start, size, strict=True)]
    block = array[(slice(None), *(slice(a, b) for a, b in zip(lo, hi, strict=True)))]
    if isinstance(block, np.ndarray):
        block = torch.from_numpy(np.array(block, dtype=np.float32))  # a copy: the map is closed after
    block = block.float()
    if block.shape[1:] != tuple(size):
        before = [a - s for a, s in zip(lo, start, strict=True)]
        after = [k - (b - a) - p for a, b, k, p in zip(lo, hi, size, before, strict=True)]
        block = F.pad(
            block, [p for pair in zip(reversed(before), reversed(after), strict=True) for p in pair]
        )
    return block
