"""The preprocessed store: written once, re-done only where a source changed, safe under racing and killed
writers, and read without a process's memory growing with the dataset."""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from monai.transforms import Compose
from omegaconf import OmegaConf

from lightning_seg.data.layout import read_datalist
from lightning_seg.data.store import Store
from lightning_seg.data.synthetic import write_synthetic_msd
from lightning_seg.data.transforms import preprocessing

from .conftest import ROOT, TINY_SYNTHETIC, compose_config, tiny_synthetic_overrides


def tiny_task(tmp_path) -> dict:
    return OmegaConf.to_container(compose_config(tmp_path, tiny_synthetic_overrides()).task, resolve=True)


def store_of(tmp_path, task_dir) -> Store:
    return Store(tmp_path / "cache", task_dir, tiny_task(tmp_path), 10000)


def folder_ids(store: Store) -> dict[str, int]:
    """Each case folder's inode: a case written again is a new folder."""
    return {p.name: p.stat().st_ino for p in store.path.iterdir() if p.is_dir() and p.name[0] != "."}


def assert_store_matches_sources(store: Store, cases: list, task: dict) -> None:
    whole = Compose(preprocessing(task))
    for case in cases:
        image, label = store.case(case).arrays(mmap=False)
        expected = whole(dict(case))
        np.testing.assert_array_equal(image, expected["image"].numpy())
        np.testing.assert_array_equal(label, expected["label"].numpy()[0])


def test_a_second_build_writes_nothing_and_a_changed_case_only_itself(tmp_path):
    task_dir = write_synthetic_msd(tmp_path / "data" / "Task00_Synthetic", **TINY_SYNTHETIC)
    cases = read_datalist(task_dir)
    store = store_of(tmp_path, task_dir)
    assert store.build(cases, workers=2) == len(cases)
    before = folder_ids(store)
    assert store.build(cases, workers=2) == 0 and folder_ids(store) == before

    # case 0's image replaced by case 1's (same grid): that case alone is written again
    shutil.copyfile(cases[1]["image"], cases[0]["image"])
    assert store.build(cases, workers=2) == 1
    after = folder_ids(store)
    changed = {name for name in after if after[name] != before[name]}
    assert changed == {store.case(cases[0]).folder.name}
    stored = [store.case(c).arrays(mmap=False)[0] for c in cases[:2]]
    np.testing.assert_array_equal(stored[0], stored[1])

    # another preprocessing setting is another store; the first stays as it was
    other = Store(tmp_path / "cache", task_dir, {**tiny_task(tmp_path), "spacing": [3.0, 3.0, 4.0]}, 10000)
    assert other.path != store.path and other.build(cases, workers=2) == len(cases)
    assert folder_ids(store) == after


BUILD = """
import sys
from omegaconf import OmegaConf
from lightning_seg.data.layout import read_datalist
from lightning_seg.data.store import Store
task = OmegaConf.to_container(OmegaConf.load(sys.argv[1]), resolve=True)
cases = read_datalist(sys.argv[2])
print(Store(sys.argv[3], sys.argv[2], task, 10000).build(cases, workers=1), flush=True)
"""


def build_process(tmp_path, task_dir) -> subprocess.Popen:
    task_file = tmp_path / "task.yaml"
    if not task_file.exists():
        OmegaConf.save(tiny_task(tmp_path), task_file)
    argv = [sys.executable, "-c", BUILD, str(task_file), str(task_dir), str(tmp_path / "cache")]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def test_two_processes_racing_on_a_fresh_folder_write_each_case_once(tmp_path):
    task_dir = write_synthetic_msd(tmp_path / "data" / "Task00_Synthetic", **TINY_SYNTHETIC)
    cases, store = read_datalist(task_dir), store_of(tmp_path, task_dir)
    store.path.mkdir(parents=True)
    with open(store.path / ".lock", "a") as lock:  # both start while a writer holds the store
        fcntl.flock(lock, fcntl.LOCK_EX)
        racers = [build_process(tmp_path, task_dir) for _ in range(2)]
        time.sleep(4)
    written = [int(p.communicate(timeout=120)[0].split()[-1]) for p in racers]
    assert all(p.returncode == 0 for p in racers)
    assert sorted(written) == [0, len(cases)]  # one wrote every case; the other waited and read them
    assert len(folder_ids(store)) == len(cases) and not list(store.path.glob(".tmp-*"))
    assert_store_matches_sources(store, cases, tiny_task(tmp_path))


def test_a_writer_killed_mid_case_leaves_nothing_a_later_run_trusts(tmp_path):
    task_dir = write_synthetic_msd(
        tmp_path / "data" / "Task00_Synthetic", num_cases=6, shape=[96, 96, 64], spacing=[1.0, 1.0, 1.0]
    )
    cases, store = read_datalist(task_dir), store_of(tmp_path, task_dir)
    writer = build_process(tmp_path, task_dir)
    deadline = time.monotonic() + 120
    while not (folder_ids(store) if store.path.is_dir() else {}) or not list(store.path.glob(".tmp-*")):
        assert writer.poll() is None and time.monotonic() < deadline, "the writer ended before the kill"
        time.sleep(0.005)
    writer.send_signal(signal.SIGKILL)  # in the middle of a case: one folder whole, one half written
    writer.wait()
    complete = folder_ids(store)
    assert 0 < len(complete) < len(cases) and list(store.path.glob(".tmp-*"))
    for name in complete:  # what is there under a case's name is whole
        assert json.loads((store.path / name / "case.json").read_text())["shape"]
    assert store.build(cases, workers=1) == len(cases) - len(complete)
    assert not list(store.path.glob(".tmp-*"))
    assert_store_matches_sources(store, cases, tiny_task(tmp_path))


PEAK_RSS = """
import itertools
import sys
import psutil
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning_seg.config import CONFIG_DIR
with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
    cfg = compose(config_name="train", overrides=sys.argv[1:])
dm = instantiate(cfg.data)
dm.prepare_data()
process, peak = psutil.Process(), 0
dm.setup("fit")  # after the store is written: what training holds, not what preprocessing did
for _ in range(3):
    for batch in itertools.chain(dm.train_dataloader(), dm.val_dataloader()):
        peak = max(peak, process.memory_info().rss)
print(dm.choose_cache()["cache"], peak, flush=True)
"""


@pytest.mark.parametrize("cache", ["disk", pytest.param("memory", marks=pytest.mark.slow)])
def test_read_from_disk_a_process_does_not_grow_with_the_number_of_cases(tmp_path, cache):
    """Peak resident memory of a second run over three epochs with validation, at 6 and at 30 cases of
    2.9 MB each: flat when patches are read from the store, growing by the training cases when held."""
    peaks = []
    for num_cases in (6, 30):
        overrides = [
            f"paths.data_dir={tmp_path / str(num_cases)}",
            f"paths.cache_dir={tmp_path / 'cache'}",
            f"task.synthetic.num_cases={num_cases}",
            "task.synthetic.shape=[96,96,64]",
            "task.synthetic.spacing=[1.5,1.5,2.0]",  # the task's: nothing to resample
            "task.patch_size=[32,32,32]",
            f"data.cache={cache}",
            "data.prep_workers=2",
        ]
        for _ in range(2):  # the second run: the first wrote the store (its peak is preprocessing's)
            run = subprocess.run(
                [sys.executable, "-c", PEAK_RSS, *overrides],
                capture_output=True,
                text=True,
                cwd=ROOT,
                check=True,
            )
        hold, peak = run.stdout.split()
        assert hold == cache
        peaks.append(int(peak))
    growth_mib = (peaks[1] - peaks[0]) / 2**20
    held_mib = 24 * 96 * 96 * 64 * 5 / 2**20  # the 24 more training cases' image and label
    if cache == "disk":
        assert growth_mib < 0.25 * held_mib, f"peak grew {growth_mib:.0f} MiB from 6 to 30 cases"
    else:
        assert growth_mib > 0.6 * held_mib, f"peak grew only {growth_mib:.0f} MiB holding the cases"


def test_new_task_preprocesses_what_training_then_reads(tmp_path, synthetic_task_dir):
    """`lightning-seg-new-task ... preprocess=true` writes the store the planned task's training reads:
    `lightning-seg-preprocess` of that task then finds every case written."""
    config, cache = tmp_path / "conf", tmp_path / "cache"
    plan = [sys.executable, "-m", "lightning_seg.new_task", str(synthetic_task_dir), "name=mine", "gpu=cpu"]
    plan += [f"config_dir={config}", f"cache_dir={cache}", "preprocess=true"]
    planned = subprocess.run(plan, capture_output=True, text=True, cwd=ROOT)
    assert planned.returncode == 0, planned.stderr
    assert f"OK: 6 cases of {synthetic_task_dir} preprocessed in {cache / 'preprocessed'}" in planned.stdout
    assert (
        "(6 written, 0 as they were" not in planned.stdout and "6 written, 0 as they were" in planned.stdout
    )
    again = subprocess.run(
        [sys.executable, "-m", "lightning_seg.preprocess", "task=mine", f"paths.cache_dir={cache}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "LIGHTNING_SEG_CONFIG_DIR": str(config)},
    )
    assert again.returncode == 0, again.stderr
    assert "; 0 written, 6 as they were;" in again.stdout
    assert len(list((cache / "preprocessed").iterdir())) == 1  # one store: the same settings, the same digest
