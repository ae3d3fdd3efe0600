"""Broken task folders fail before training, with a message naming the file."""

import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
from hydra.utils import instantiate

from lightning_seg.data.checks import DatasetError, check_dataset
from lightning_seg.data.synthetic import write_synthetic_msd

from .conftest import compose_config, tiny_synthetic_overrides

LABELS, CHANNELS = ["background", "organ_a", "organ_b"], 1


@pytest.fixture
def task_dir(tmp_path, synthetic_task_dir):
    return shutil.copytree(synthetic_task_dir, tmp_path / "Task00_Synthetic")


def first_case(task_dir, key):
    entry = json.loads((task_dir / "dataset.json").read_text())["training"][0]
    return task_dir / entry[key]


def check(task_dir):
    return check_dataset(task_dir, LABELS, CHANNELS)


def test_intact_folder_passes_and_lists_its_cases(task_dir):
    cases = check(task_dir)
    assert len(cases) == 6 and all(p.endswith(".nii.gz") for c in cases for p in c.values())


def test_missing_file(task_dir):
    label = first_case(task_dir, "label")
    label.unlink()
    with pytest.raises(DatasetError, match="do not exist") as err:
        check(task_dir)
    assert str(label) in str(err.value)


def test_shape_mismatch(task_dir):
    label = first_case(task_dir, "label")
    nib.save(nib.Nifti1Image(np.zeros((30, 32, 24), np.uint8), np.diag([1.5, 1.5, 2.0, 1])), label)
    with pytest.raises(DatasetError, match=r"shape \(30, 32, 24\) differs") as err:
        check(task_dir)
    assert str(label) in str(err.value)


def test_affine_mismatch(task_dir):
    label = first_case(task_dir, "label")
    img = nib.load(label)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.diag([1.0, 1.5, 2.0, 1])), label)
    with pytest.raises(DatasetError, match="affine differs") as err:
        check(task_dir)
    assert str(label) in str(err.value)


def test_a_label_with_a_trailing_singleton_axis_is_accepted(task_dir):
    label = first_case(task_dir, "label")
    img = nib.load(label)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[..., None], img.affine), label)
    assert len(check(task_dir)) == 6


def test_affine_rounding_is_tolerated(task_dir):
    label = first_case(task_dir, "label")
    img = nib.load(label)
    affine = img.affine.copy()
    affine[0, 3] += 1e-4  # origin off by 0.1 micrometre
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), label)
    assert len(check(task_dir)) == 6


def test_label_values_outside_the_task(task_dir):
    label = first_case(task_dir, "label")
    img = nib.load(label)
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, img.affine), label)
    with pytest.raises(DatasetError, match=r"label values \[7\] outside the task's 0..2") as err:
        check(task_dir)
    assert str(label) in str(err.value)


def test_truncated_file(task_dir):
    image = first_case(task_dir, "image")
    raw = gzip.decompress(image.read_bytes())
    image.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(DatasetError, match="cannot be read as NIfTI") as err:
        check(task_dir)
    assert str(image) in str(err.value)


def test_not_a_nifti_file(task_dir):
    image = first_case(task_dir, "image")
    image.write_bytes(b"this is not an image")
    with pytest.raises(DatasetError, match="cannot be read as NIfTI") as err:
        check(task_dir)
    assert str(image) in str(err.value)


def test_nan_in_image(task_dir):
    image = first_case(task_dir, "image")
    img = nib.load(image)
    data = np.asarray(img.dataobj).copy()
    data[1, 1, 1] = np.nan
    nib.save(nib.Nifti1Image(data, img.affine), image)
    with pytest.raises(DatasetError, match="NaN") as err:
        check(task_dir)
    assert str(image) in str(err.value)


def test_wrong_channel_count(task_dir):
    with pytest.raises(DatasetError, match="in_channels=4"):
        check_dataset(task_dir, LABELS, 4)


def test_wrong_label_count(task_dir):
    with pytest.raises(DatasetError, match="declares 3 labels"):
        check_dataset(task_dir, ["background", "spleen"], CHANNELS)


@pytest.mark.parametrize(
    "content,problem",
    [
        ("{not json", "not valid JSON"),
        ('{"name": "x"}', "no 'training' list"),
        ('{"training": [{"image": "a.nii.gz"}]}', "needs 'image' and 'label'"),
    ],
)
def test_bad_dataset_json(task_dir, content, problem):
    (task_dir / "dataset.json").write_text(content)
    with pytest.raises(DatasetError, match=problem) as err:
        check(task_dir)
    assert str(task_dir / "dataset.json") in str(err.value)


def test_all_problems_reported_at_once(task_dir):
    entries = json.loads((task_dir / "dataset.json").read_text())["training"]
    for entry in entries[:2]:
        (task_dir / entry["image"]).write_bytes(b"broken")
    with pytest.raises(DatasetError, match="2 broken case") as err:
        check(task_dir)
    assert all(str((task_dir / e["image"]).resolve()) in str(err.value) for e in entries[:2])


def test_check_results_are_remembered_until_a_file_changes(task_dir, tmp_path):
    cache = tmp_path / "cache"
    check_dataset(task_dir, LABELS, CHANNELS, cache_dir=cache)
    assert len(list((cache / "checked").glob("*.json"))) == 1
    image = first_case(task_dir, "image")
    image.write_bytes(b"broken later")
    with pytest.raises(DatasetError, match="cannot be read"):
        check_dataset(task_dir, LABELS, CHANNELS, cache_dir=cache)


def test_training_refuses_a_broken_folder_before_the_first_step(tmp_path):
    data_dir = tmp_path / "data"
    write_synthetic_msd(data_dir / "Task00_Synthetic", num_cases=4, shape=(32, 32, 24))
    label = data_dir / "Task00_Synthetic" / "labelsTr" / "synthetic_002.nii.gz"
    label.unlink()
    cfg = compose_config(
        tmp_path, [*tiny_synthetic_overrides(), "trainer.fast_dev_run=true"], data_dir=data_dir
    )
    from lightning_seg.training import train

    with pytest.raises(DatasetError, match="synthetic_002.nii.gz"):
        train(cfg)
    assert not list((tmp_path / "run").glob("checkpoints/*.ckpt"))


def test_missing_task_folder_says_where_and_how(tmp_path):
    cfg = compose_config(tmp_path, ["task=spleen"])
    datamodule = instantiate(cfg.data)
    with pytest.raises(DatasetError) as err:
        datamodule.prepare_data()
    message = str(err.value)
    assert str(tmp_path / "data" / "Task09_Spleen") in message
    assert "task.download=true" in message and "Task09_Spleen.tar" in message


def test_dataset_and_config_errors_are_user_errors_and_still_value_errors():
    from lightning_seg.errors import ConfigError, UserError

    for cls in (DatasetError, ConfigError):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError)


def test_non_integer_label_values(task_dir):
    label = first_case(task_dir, "label")
    img = nib.load(label)
    data = np.asarray(img.dataobj).astype(np.float32)
    data[0, 0, 0] = 0.5  # what linear interpolation of a label map leaves
    nib.save(nib.Nifti1Image(data, img.affine), label)
    with pytest.raises(DatasetError, match=r"non-integer label values \[0.5\]") as err:
        check(task_dir)
    assert str(label) in str(err.value) and "outside" not in str(err.value)


def write_zero_voxel_size(path, data):
    """A NIfTI whose voxel size holds a zero and whose sform/qform codes are 0: no spacing at all.
    (nibabel replaces the zero by 1 when it loads the header.)"""
    img = nib.Nifti1Image(data, None)  # no affine: sform and qform codes stay 0
    img.header.set_zooms((1.5, 1.5, 2.0))
    img.header["pixdim"][1] = 0.0
    nib.save(img, path)


def test_zero_voxel_size_without_sform_or_qform(task_dir):
    image = first_case(task_dir, "image")
    write_zero_voxel_size(image, np.asarray(nib.load(image).dataobj))
    with pytest.raises(DatasetError, match="singular affine") as err:
        check(task_dir)
    assert str(image) in str(err.value) and "pixdim" in str(err.value)


def test_singular_sform(task_dir):
    label = first_case(task_dir, "label")
    img = nib.Nifti1Image(np.asarray(nib.load(label).dataobj), None)
    sform = np.diag([1.5, 1.5, 2.0, 1.0])
    sform[2, 2] = 0.0
    img.header.set_sform(sform, code=1)
    nib.save(img, label)
    with pytest.raises(DatasetError, match="singular affine") as err:
        check(task_dir)
    assert str(label) in str(err.value)


def test_missing_and_broken_files_are_reported_together_and_good_cases_remembered(task_dir, tmp_path):
    entries = json.loads((task_dir / "dataset.json").read_text())["training"]
    missing, broken = task_dir / entries[0]["label"], task_dir / entries[1]["image"]
    missing.unlink()
    broken.write_bytes(b"broken")
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="1 file.* do not exist, 1 broken case") as err:
        check_dataset(task_dir, LABELS, CHANNELS, cache_dir=cache)
    assert str(missing.resolve()) in str(err.value) and str(broken.resolve()) in str(err.value)
    memo = json.loads(next((cache / "checked").glob("*.json")).read_text())
    assert len(memo) == 4  # the four good cases are not read again on the rerun
