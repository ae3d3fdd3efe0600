"""Fetch an official MSD archive (MONAI's URLs and MD5 sums) into the data folder."""

import shutil
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from monai.apps.datasets import DecathlonDataset
from monai.apps.utils import download_and_extract, extractall

from lightning_seg.data.layout import DatasetError


def msd_source(msd_folder: str, url: str | None = None, md5: str | None = None) -> tuple[str, str | None]:
    """URL and MD5 of a task archive: the given ones, else those MONAI's DecathlonDataset uses."""
    if url:
        return url, md5
    if msd_folder not in DecathlonDataset.resource:
        raise DatasetError(f"no known MSD archive for '{msd_folder}': set task.url (and task.md5)")
    return DecathlonDataset.resource[msd_folder], DecathlonDataset.md5[msd_folder]


def download_msd_task(
    task_dir: Path, msd_folder: str, url: str | None = None, md5: str | None = None
) -> None:
    """Download and extract `<msd_folder>.tar` next to `task_dir`, verifying its MD5."""
    url, md5 = msd_source(msd_folder, url, md5)
    task_dir.parent.mkdir(parents=True, exist_ok=True)
    archive = task_dir.parent / f"{msd_folder}.tar"
    try:
        if url.startswith("file://"):  # a local mirror; MONAI's downloader speaks only HTTP(S)
            shutil.copyfile(url2pathname(urlparse(url).path), archive)
            extractall(archive, output_dir=task_dir.parent, hash_val=md5, hash_type="md5")
        else:
            download_and_extract(url, filepath=str(archive), output_dir=str(task_dir.parent), hash_val=md5)
    except Exception as err:  # network, checksum and archive errors all end the same way for the user
        raise DatasetError(
            f"could not fetch {url} into {task_dir.parent} ({type(err).__name__}: {err}). "
            f"Remove {archive} if it is a partial download, or download and extract it by hand "
            f"so that {task_dir}/dataset.json exists."
        ) from err
    if not (task_dir / "dataset.json").is_file():
        raise DatasetError(f"{archive}: extracted, but holds no {msd_folder}/dataset.json")
