"""The MSD download path, exercised against a local archive (never the network)."""

import hashlib
import tarfile

import pytest
from hydra.utils import instantiate

from lightning_seg.data.download import msd_source
from lightning_seg.data.layout import DatasetError

from .conftest import compose_config


@pytest.fixture
def archive(tmp_path, synthetic_task_dir):
    """A tarball laid out like the official ones: <TaskXX_Name>/dataset.json, imagesTr/, labelsTr/."""
    path = tmp_path / "remote" / "Task09_Spleen.tar"
    path.parent.mkdir()
    with tarfile.open(path, "w") as tar:
        tar.add(synthetic_task_dir, arcname="Task09_Spleen")
    return path, hashlib.md5(path.read_bytes()).hexdigest()


def spleen_config(tmp_path, url, md5):
    # the synthetic archive has 3 labels; the spleen task is given the same for this test
    return compose_config(
        tmp_path,
        [
            "task=spleen",
            "task.download=true",
            f"task.url={url}",
            f"task.md5={md5}",
            "task.labels=[background,organ_a,organ_b]",
        ],
    )


def test_download_fetches_checks_and_extracts(tmp_path, archive):
    path, md5 = archive
    datamodule = instantiate(spleen_config(tmp_path, path.as_uri(), md5).data)
    datamodule.prepare_data()
    assert (tmp_path / "data" / "Task09_Spleen" / "dataset.json").is_file()
    assert len(list((tmp_path / "data" / "Task09_Spleen" / "imagesTr").glob("*.nii.gz"))) == 6


def test_checksum_mismatch_is_an_error(tmp_path, archive):
    path, _ = archive
    datamodule = instantiate(spleen_config(tmp_path, path.as_uri(), "0" * 32).data)
    with pytest.raises(DatasetError, match="could not fetch"):
        datamodule.prepare_data()
    assert not (tmp_path / "data" / "Task09_Spleen" / "dataset.json").exists()


def test_official_sources_come_from_monai():
    url, md5 = msd_source("Task02_Heart")
    assert url.endswith("Task02_Heart.tar") and len(md5) == 32
    with pytest.raises(DatasetError, match="task.url"):
        msd_source("Task99_Unknown")
