"""A dataset folder from elsewhere is untrusted (issue 28): a gzip bomb (a header promising 2000^3 float32
voxels, 30 GiB of zeros in about 30 MB) is refused from its header by the dataset check, predict and
lightning-seg-new-task, in seconds and under 1 GiB; a dataset.json path leaving the task folder is refused
unless the user allows it."""

import functools
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lightning_seg.data.checks import check_dataset
from lightning_seg.data.image_size import MAX_IMAGE_GIB, size_problem
from lightning_seg.data.layout import DatasetError, read_datalist
from lightning_seg.errors import InputError
from lightning_seg.inference import Predictor

from .test_errors import assert_clean_error

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "synthetic_width4_v1.ckpt"
BOMB_SHAPE = (2000, 2000, 2000)
LABELS = ["background", "organ_a", "organ_b"]


def write_gzip_bomb(path: Path, shape=BOMB_SHAPE) -> Path:
    """A .nii.gz whose header promises `shape` float32 voxels, all there: zeros in gzip members of 64 MB,
    each compressed once and repeated (gzip readers join the members into one stream)."""
    header = nib.Nifti1Image(np.zeros((1, 1, 1), np.float32), np.diag([1.0, 1.0, 1.0, 1.0])).header
    header.set_data_shape(shape)
    header["vox_offset"] = 352  # the 348-byte header, 4 extension bytes, then the voxels
    chunk = 64_000_000
    total = int(np.prod(shape)) * 4
    assert total % chunk == 0
    zeros = _gzip_member(bytes(chunk))
    with open(path, "wb") as out:
        out.write(_gzip_member(header.binaryblock + bytes(4) + bytes(chunk)))
        for _ in range(total // chunk - 1):
            out.write(zeros)
    return path


def _gzip_member(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # wbits 31: a gzip member
    return compressor.compress(data) + compressor.flush()


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return write_gzip_bomb(tmp_path_factory.mktemp("bomb") / "bomb.nii.gz")


@pytest.fixture
def bombed_task(tmp_path, synthetic_task_dir, bomb) -> Path:
    """The tiny synthetic task with its first image replaced by the bomb."""
    task = shutil.copytree(synthetic_task_dir, tmp_path / "data" / synthetic_task_dir.name)
    image = task / json.loads((task / "dataset.json").read_text())["training"][0]["image"]
    shutil.copyfile(bomb, image)
    return task


# ru_maxrss survives exec: a command spawned straight from pytest reports at least pytest's own peak
# (CI's, grown over the suite, read 1.05 GiB for a refusal). Spawned by this small launcher, the command
# starts from the launcher's address space, and its peak is its own.
PEAK_LAUNCHER = """
import os, sys
peak_file, command = sys.argv[1], sys.argv[2:]
_, status, usage = os.wait4(os.spawnv(os.P_NOWAIT, command[0], command), 0)
open(peak_file, "w").write(str(usage.ru_maxrss))
sys.exit(os.waitstatus_to_exitcode(status))
"""


Measured = tuple[subprocess.CompletedProcess, float, float]


def run_measured(*command: str, python_option: str = "-m") -> Measured:
    """`python -m <command>` (or `-c`) from the repo root: (result, seconds, its peak resident GiB)."""
    with tempfile.NamedTemporaryFile("r") as peak_kib:
        start = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-c", PEAK_LAUNCHER, peak_kib.name, sys.executable, python_option, *command],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        seconds = time.perf_counter() - start
        peak_gib = int(peak_kib.read()) / 2**20  # KiB on Linux
    return subprocess.CompletedProcess(command, result.returncode, result.stdout, ""), seconds, peak_gib


@functools.cache
def peak_bar_gib() -> float:
    """1 GiB, plus what importing this torch holds beyond a CPU build's 0.25 GiB: a CUDA build maps its
    libraries at import (0.60 GiB for torch 2.10+cu128 in `make test-lowest`, 0.21 for 2.13+cpu), whatever
    the command does after. On the CPU build the project installs, the bar is 1 GiB."""
    _, _, torch_gib = run_measured("import torch", python_option="-c")
    return 1.0 + max(0.0, torch_gib - 0.25)


def assert_bomb_refused(result, seconds, peak_gib, bomb: Path) -> None:
    output = assert_clean_error(
        result, str(bomb.name), "8,000,000,000 voxels", "29.8 GiB", f"{MAX_IMAGE_GIB:g} GiB"
    )
    assert peak_gib < peak_bar_gib(), f"peak {peak_gib:.2f} GiB (bar {peak_bar_gib():.2f})\n{output}"
    # a few seconds of imports (torch, MONAI) on a loaded 2-core machine; decompressing would take minutes
    assert seconds < 30, f"{seconds:.1f} s\n{output}"


def test_the_bomb_is_what_it_claims_a_few_mb_promising_30_gib(bomb):
    assert bomb.stat().st_size < 40 * 2**20
    assert nib.load(bomb).shape == BOMB_SHAPE
    started = time.perf_counter()
    problem = size_problem(bomb)
    assert problem and "8,000,000,000 voxels (29.8 GiB" in problem and "4 GiB limit" in problem
    assert time.perf_counter() - started < 1.0
    assert size_problem(bomb, max_gib=30) is None  # the limit is a setting


def test_the_dataset_check_refuses_it_unread(bombed_task, tmp_path):
    started = time.perf_counter()
    with pytest.raises(
        DatasetError,
        match=r"synthetic_000\.nii\.gz: its header promises .* 8,000,000,000 voxels .*data\.max_image_gib",
    ):
        check_dataset(bombed_task, LABELS, 1)
    assert time.perf_counter() - started < 5.0
    result, seconds, peak = run_measured(
        "lightning_seg.check",
        f"paths.data_dir={bombed_task.parent}",
        f"paths.cache_dir={tmp_path / 'cache'}",
        f"paths.log_dir={tmp_path / 'logs'}",
    )
    assert_bomb_refused(result, seconds, peak, bombed_task / "imagesTr")


def test_predict_refuses_it_unread(bomb, tmp_path):
    result, seconds, peak = run_measured(
        "lightning_seg.predict", f"ckpt_path={FIXTURE}", f"input={bomb}", f"output={tmp_path / 'out'}"
    )
    assert_bomb_refused(result, seconds, peak, bomb)
    assert not list((tmp_path / "out").glob("*.nii.gz"))


def test_new_task_refuses_it_unread(bombed_task, tmp_path):
    result, seconds, peak = run_measured(
        "lightning_seg.new_task",
        str(bombed_task),
        "name=bombed",
        f"config_dir={tmp_path / 'conf'}",
        f"cache_dir={tmp_path / 'cache'}",
    )
    assert_bomb_refused(result, seconds, peak, bombed_task / "imagesTr")
    assert not (tmp_path / "conf" / "task" / "bombed.yaml").exists()


def test_predict_refuses_an_image_the_checkpoint_s_spacing_would_blow_up(tmp_path):
    """64^3 voxels of 1 mm, resampled to a checkpoint's 0.01 mm: 2.6e11 voxels, refused from the header."""
    checkpoint = torch.load(FIXTURE, weights_only=True)
    checkpoint["hyper_parameters"]["run_config"]["task"]["spacing"] = [0.01, 0.01, 0.01]
    torch.save(checkpoint, ckpt := tmp_path / "fine.ckpt")
    nib.save(
        nib.Nifti1Image(np.zeros((64, 64, 64), np.float32), np.eye(4)), image := tmp_path / "case.nii.gz"
    )
    with pytest.raises(
        InputError, match=r"262,144 voxels, 262,144,000,000 once resampled to the spacing \[0.01"
    ):
        Predictor(ckpt).predict(image)


def leaking_msd_task(tmp_path: Path, synthetic_task_dir: Path, path: str) -> Path:
    task = shutil.copytree(synthetic_task_dir, tmp_path / "data" / synthetic_task_dir.name)
    meta = json.loads((task / "dataset.json").read_text())
    meta["training"][1]["image"] = path
    (task / "dataset.json").write_text(json.dumps(meta))
    return task


@pytest.mark.parametrize("outside", ["../../secret.nii.gz", "/etc/passwd", "imagesTr/../../elsewhere.nii.gz"])
def test_a_dataset_json_path_leaving_the_task_folder_is_refused(tmp_path, synthetic_task_dir, outside):
    task = leaking_msd_task(tmp_path, synthetic_task_dir, outside)
    with pytest.raises(
        DatasetError, match=rf"dataset\.json: training entry 1 'image' names '{outside}', outside"
    ):
        read_datalist(task)
    assert read_datalist(task, allow_outside_paths=True)[1]["image"] == str((task / outside).resolve())


def test_a_folder_the_user_links_in_stays_inside(tmp_path, synthetic_task_dir):
    """Compared as written: an imagesTr/ that is the user's symlink to another disk is theirs."""
    task = shutil.copytree(synthetic_task_dir, tmp_path / "task", ignore=shutil.ignore_patterns("imagesTr"))
    (task / "imagesTr").symlink_to(synthetic_task_dir / "imagesTr")
    assert len(read_datalist(task)) == len(read_datalist(synthetic_task_dir))


def test_nnunet_dataset_entries_leaving_the_folder_are_refused(tmp_path):
    task = tmp_path / "Dataset001_X"
    task.mkdir()
    meta = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "organ": 1},
        "numTraining": 1,
        "file_ending": ".nii.gz",
        "dataset": {"a": {"images": ["imagesTr/a_0000.nii.gz"], "label": "../../home/user/.ssh/id_rsa"}},
    }
    (task / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(
        DatasetError, match=r"dataset entry 'a' label names '\.\./\.\./home/user/\.ssh/id_rsa'"
    ):
        read_datalist(task)


def test_the_check_command_names_dataset_json_and_the_entry(tmp_path, synthetic_task_dir):
    task = leaking_msd_task(tmp_path, synthetic_task_dir, "../../secret.nii.gz")
    paths = [f"paths.data_dir={task.parent}", f"paths.cache_dir={tmp_path / 'cache'}"]
    result, _, _ = run_measured("lightning_seg.check", *paths)
    assert_clean_error(
        result, str(task / "dataset.json"), "training entry 1 'image'", "data.allow_outside_paths"
    )
