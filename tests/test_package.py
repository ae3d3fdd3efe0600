"""The wheel a user installs: it holds conf/ and runs every console script outside the checkout."""

import importlib.metadata
import json
import os
import site
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
QUICK = [
    "hardware=cpu",
    "model.width=4",
    "task.synthetic.num_cases=6",
    "task.synthetic.shape=[32,32,24]",
    "trainer.max_steps=2",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
]


def run(command: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def test_wheel_installs_and_runs_from_an_empty_directory(tmp_path):
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        ROOT,
    )
    (wheel,) = tmp_path.glob("lightning_seg-*.whl")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    # the dependencies come from this environment (no download), the project only from the wheel
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (purelib / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    bin_dir = venv / "bin"
    run([str(bin_dir / "python"), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)], tmp_path)

    work = tmp_path / "work"
    work.mkdir()
    where = run(
        [str(bin_dir / "python"), "-c", "import lightning_seg.config as c; print(c.CONFIG_DIR)"], work
    )
    assert Path(where.stdout.strip()) == purelib / "lightning_seg" / "conf"
    assert {p.name for p in (purelib / "lightning_seg" / "conf").iterdir()} >= {"train.yaml", "task", "hydra"}

    run([str(bin_dir / "lightning-seg-train"), *QUICK, "hydra.run.dir=outputs/run"], work)
    ckpt = work / "outputs" / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and (work / "data" / "Task00_Synthetic" / "dataset.json").is_file()

    # a planned task lands in the user config dir (~/.config/lightning_seg), which every command searches
    home = {**os.environ, "HOME": str(tmp_path / "home")}
    home.pop("LIGHTNING_SEG_CONFIG_DIR", None)
    run(
        [str(bin_dir / "lightning-seg-new-task"), "data/Task00_Synthetic", "name=mine", "gpu=cpu"], work, home
    )
    assert (tmp_path / "home" / ".config" / "lightning_seg" / "task" / "mine.yaml").is_file()
    run(
        [str(bin_dir / "lightning-seg-train"), "task=mine", *QUICK[:2], *QUICK[4:], "hydra.run.dir=mine"],
        work,
        home,
    )
    assert (work / "mine" / "checkpoints" / "last.ckpt").is_file()

    images = work / "data" / "Task00_Synthetic" / "imagesTr"
    case = sorted(images.iterdir())[0]
    run([str(bin_dir / "lightning-seg-predict"), f"ckpt_path={ckpt}", f"input={case}", "output=pred"], work)
    assert (work / "pred" / case.name).is_file()
    labels = work / "data" / "Task00_Synthetic" / "labelsTr"
    run([str(bin_dir / "lightning-seg-evaluate"), "pred=pred", f"ref={labels}", "output=scores"], work)
    assert json.loads((work / "scores" / "summary.json").read_text())["cases"] == 1
    run([str(bin_dir / "lightning-seg-validate"), f"ckpt_path={ckpt}", "hydra.run.dir=val"], work)
    assert "val/dice" in json.loads((work / "val" / "val_metrics.json").read_text())
    bench = [
        "bench=cpu_smoke",
        "bench.precisions=[32]",
        "bench.points=[[32,1]]",
        "bench.steps=2",
        "model.width=4",
    ]
    run([str(bin_dir / "lightning-seg-bench"), *bench, "hydra.run.dir=bench"], work)
    assert json.loads((work / "bench" / "bench.json").read_text())


@pytest.mark.skipif("LIGHTNING_SEG_FLOORS" not in os.environ, reason="only in `make test-lowest`")
def test_the_lowest_versions_run_has_the_floors_installed():
    """`make test-lowest` tests what it says: each package at the floor pyproject.toml gives it."""
    for line in Path(os.environ["LIGHTNING_SEG_FLOORS"]).read_text().split():
        name, floor = line.split("==")
        installed = Version(importlib.metadata.version(name))
        assert Version(installed.base_version) == Version(floor), f"{name} {installed}, floor {floor}"
