"""Errors a user can read: the real command lines, run as a user runs them, print one `error:` message
naming the file or key, exit with code 2 and show no traceback unless asked (issue 9)."""

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf.errors import InterpolationResolutionError

from lightning_seg.config import CONFIG_DIR
from lightning_seg.data.synthetic import write_synthetic_msd
from lightning_seg.entry import OutputDirCheck, user_message

from .conftest import TINY_SYNTHETIC, compose_config, tiny_synthetic_overrides
from .test_dataset_checks import write_zero_voxel_size

ROOT = Path(__file__).resolve().parents[1]


def run(
    tmp_path: Path, *overrides: str, command=("train.py",), env=None, tiny=True
) -> subprocess.CompletedProcess:
    """`python train.py <overrides>` (or another command) from the repo root, writing only under tmp_path;
    `tiny`: the tiny synthetic task's overrides and fast_dev_run."""
    paths = [
        f"paths.data_dir={tmp_path / 'data'}",
        f"paths.log_dir={tmp_path / 'outputs'}",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]
    if command == ("train.py",):
        paths.append(f"hydra.run.dir={tmp_path / 'run'}")
        overrides = (*(tiny_synthetic_overrides() if tiny else []), "trainer.fast_dev_run=true", *overrides)
    return subprocess.run(
        [sys.executable, *command, *paths, *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**{k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}, **(env or {})},
        timeout=300,
    )


def assert_clean_error(result: subprocess.CompletedProcess, *named: str, code: int = 2) -> str:
    """Exit `code`, every string of `named` in the output, no traceback; the output returned."""
    output = result.stdout + result.stderr
    assert result.returncode == code, output
    assert "Traceback" not in output, output
    for text in named:
        assert text in output, f"{text!r} not in:\n{output}"
    return output


def case_files(task_dir: Path, i: int) -> tuple[Path, Path]:
    entry = json.loads((task_dir / "dataset.json").read_text())["training"][i]
    return (task_dir / entry["image"]).resolve(), (task_dir / entry["label"]).resolve()


def truncate(image, label):
    raw = gzip.decompress(image.read_bytes())
    image.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    return image, "cannot be read as NIfTI"


def text_file(image, label):
    image.write_text("not an image, whatever the name says\n")
    return image, "cannot be read as NIfTI"


def shape_mismatch(image, label):
    nib.save(nib.Nifti1Image(np.zeros((30, 32, 24), np.uint8), nib.load(label).affine), label)
    return label, "shape (30, 32, 24) differs"


def label_outside_the_task(image, label):
    img = nib.load(label)
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, img.affine), label)
    return label, "label values [7] outside the task's 0..2"


def missing_label(image, label):
    label.unlink()
    return label, "missing"


def nan_voxels(image, label):
    img = nib.load(image)
    data = np.asarray(img.dataobj).copy()
    data[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), image)
    return image, "contains NaN"


def singular_affine(image, label):
    write_zero_voxel_size(image, np.asarray(nib.load(image).dataobj))
    return image, "singular affine"


BREAKAGES = [
    truncate,
    text_file,
    shape_mismatch,
    label_outside_the_task,
    missing_label,
    nan_voxels,
    singular_affine,
]


@pytest.fixture(scope="module")
def broken_folder_run(tmp_path_factory):
    """One training run on a folder with one broken case per breakage (one start-up for all of them):
    its result and, per breakage, the file and the words the message must hold."""
    tmp_path = tmp_path_factory.mktemp("broken")
    task_dir = write_synthetic_msd(
        tmp_path / "data" / "Task00_Synthetic", **{**TINY_SYNTHETIC, "num_cases": len(BREAKAGES) + 2}
    )
    expected = {breakage.__name__: breakage(*case_files(task_dir, i)) for i, breakage in enumerate(BREAKAGES)}
    return run(tmp_path), expected, tmp_path


def test_a_broken_folder_stops_training_with_one_clean_message(broken_folder_run):
    result, _, tmp_path = broken_folder_run
    output = assert_clean_error(result, "error: 1 file(s) listed in", f"{len(BREAKAGES) - 1} broken case(s)")
    assert output.count("error:") == 1
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))
    log = (tmp_path / "run" / "train.log").read_text()
    assert "error: 1 file(s) listed in" in log and "Traceback" in log  # the log file keeps the details


@pytest.mark.parametrize("breakage", [b.__name__ for b in BREAKAGES])
def test_each_broken_file_is_named_with_its_problem(broken_folder_run, breakage):
    result, expected, _ = broken_folder_run
    path, problem = expected[breakage]
    line = next((li for li in result.stderr.splitlines() if str(path) in li), None)
    assert line is not None, f"{path} not named in:\n{result.stderr}"
    assert problem in line


def test_broken_dataset_json(tmp_path, synthetic_task_dir):
    task_dir = shutil.copytree(synthetic_task_dir, tmp_path / "data" / "Task00_Synthetic")
    (task_dir / "dataset.json").write_text('{"training": [')
    assert_clean_error(run(tmp_path), f"error: {task_dir / 'dataset.json'}: not valid JSON")


def test_unknown_task_fails_at_composition_with_the_choices(tmp_path):
    # Hydra's own composition error: its message and the available choices, no traceback, exit code 1
    output = assert_clean_error(
        run(tmp_path, "task=nope"), "Could not find 'task/nope'", "hippocampus", code=1
    )
    assert "HYDRA_FULL_ERROR" in output


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.batch_size=3", "error: data.batch_size=3 must be a multiple of data.samples_per_volume=2"),
        ("precision=17", "error: precision=17: choose one of 32, tf32, 16, bf16"),
        # more volumes per step than cases train: Lightning would end at once, exit code 0, nothing trained
        ("data.batch_size=12", "error: data.batch_size=12 draws 6 training volumes per step"),
        ("data.cache=ram", "error: data.cache must be one of auto, memory, disk, gpu, got 'ram'"),
        (
            "task.patch_size=[24,24,24]",
            "error: task.patch_size=[24,24,24]: model=basic_unet down-samples 4 times",
        ),
    ],
)
def test_config_problems_name_the_key(tmp_path, synthetic_task_dir, override, message):
    shutil.copytree(synthetic_task_dir, tmp_path / "data" / "Task00_Synthetic")
    assert_clean_error(run(tmp_path, override, "model=basic_unet"), message)


def test_missing_data_folder_says_where_and_how(tmp_path):
    result = run(tmp_path, "task=hippocampus", "paths.data_dir=/nonexistent", tiny=False)
    assert_clean_error(result, "error: /nonexistent/Task04_Hippocampus: no such folder", "paths.data_dir")


def output_dir_check_override() -> list[str]:
    """The run-dir check's override while conf/hydra/default.yaml lacks it (nothing once it is there)."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        hydra_cfg = compose(config_name="train", return_hydra_config=True).hydra
    if any(
        c.get("_target_", "").endswith("OutputDirCheck") for c in (hydra_cfg.get("callbacks") or {}).values()
    ):
        return []
    return [f"++hydra.callbacks.output_dir._target_={OutputDirCheck.__module__}.OutputDirCheck"]


def test_run_dir_under_a_regular_file(tmp_path):
    (tmp_path / "taken").write_text("a file where the run dir's parent should be")
    result = run(tmp_path, *output_dir_check_override(), f"hydra.run.dir={tmp_path / 'taken' / 'run'}")
    assert_clean_error(result, f"{tmp_path / 'taken'} is a file", "pick another hydra.run.dir")


def test_hydra_full_error_shows_the_traceback(tmp_path):
    result = run(tmp_path, "precision=17", env={"HYDRA_FULL_ERROR": "1"})
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" in output and "error: precision=17" in output


def test_check_command_passes_a_good_folder(tmp_path, synthetic_task_dir):
    shutil.copytree(synthetic_task_dir, tmp_path / "data" / "Task00_Synthetic")
    result = run(tmp_path, command=("-m", "lightning_seg.check"))
    output = assert_clean_error(result, "OK: 6 cases", code=0)
    assert str(tmp_path / "data" / "Task00_Synthetic") in output


def test_check_command_names_the_broken_file(tmp_path, synthetic_task_dir):
    task_dir = shutil.copytree(synthetic_task_dir, tmp_path / "data" / "Task00_Synthetic")
    image, problem = truncate(*case_files(task_dir, 2))
    result = run(tmp_path, command=("-m", "lightning_seg.check"))
    assert_clean_error(result, f"error: 1 broken case(s) in {task_dir}", f"{image}: {problem}")
    assert "OK" not in result.stdout


def test_check_command_verbose_shows_the_traceback(tmp_path):
    result = run(tmp_path, "task=hippocampus", "verbose=true", command=("-m", "lightning_seg.check"))
    output = result.stdout + result.stderr
    assert result.returncode == 2 and "Traceback" in output and "Task04_Hippocampus: no such folder" in output


# the unwrapping, in process


def test_user_error_found_inside_hydra_instantiate(tmp_path):
    cfg = compose_config(tmp_path, ["data.batch_size=3"])
    with pytest.raises(InstantiationException) as err:
        instantiate(cfg.data)
    assert user_message(err.value) == "data.batch_size=3 must be a multiple of data.samples_per_volume=2"


def test_user_error_found_inside_an_omegaconf_resolver(tmp_path):
    cfg = compose_config(tmp_path, ["precision=8"])
    with pytest.raises(InterpolationResolutionError) as err:
        _ = cfg.trainer.precision
    assert user_message(err.value) == "precision=8: choose one of 32, tf32, 16, bf16, or auto (training)"


def test_a_bug_keeps_its_traceback():
    try:
        try:
            raise KeyError("labels")
        except KeyError as inner:
            raise RuntimeError("something else broke") from inner
    except RuntimeError as err:
        assert user_message(err) is None


def test_path_errors_name_the_blocking_file_and_the_setting(tmp_path):
    cfg = compose_config(tmp_path, [f"paths.cache_dir={tmp_path / 'taken' / 'cache'}"])
    (tmp_path / "taken").write_text("")
    with pytest.raises(OSError) as err:
        (tmp_path / "taken" / "cache" / "checked").mkdir(parents=True)
    message = user_message(err.value, cfg)
    assert f"{tmp_path / 'taken'} is a file" in message and "paths.cache_dir" in message
    full = OSError(28, "No space left on device", str(tmp_path / "outputs" / "x.ckpt"))
    assert "no space left" in user_message(full, cfg) and "paths.log_dir" in user_message(full, cfg)
