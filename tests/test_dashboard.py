"""The sweep dashboard: the offline HTML page and the W&B workspace spec (built, never saved)."""

import subprocess
import sys

from lightning_seg.study.dashboard import run_name, workspace
from lightning_seg.study.report import load_runs

from .conftest import ROOT


def test_offline_page_names_every_run_and_shows_its_pictures(tiny_sweep, tmp_path):
    out = tmp_path / "dashboard"
    done = subprocess.run(
        [sys.executable, "-m", "lightning_seg.study.dashboard", str(tiny_sweep), "--out", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    assert "online W&B login" in done.stdout and "wandb login" in done.stdout
    page = (out / "index.html").read_text()
    runs = load_runs(tiny_sweep)
    assert len(runs) == 4
    for run in runs:
        assert run_name(run, tiny_sweep) in page
        overlays = sorted((run.path / "val_images").glob("epoch0001-*.png"))
        assert len(overlays) == 1 and overlays[0].name in page  # the latest validation's picture
    for section in ("Validation Dice vs training time", "Time to accuracy", "Equal accuracy", "Loss scale"):
        assert section in page
    for picture in ("dice_vs_time.png", "dice_vs_time_mean.png", "phases.png", "memory.png"):
        assert (out / picture).stat().st_size > 1000 and f'src="{picture}"' in page
    assert "no loss scale" in page  # fp32 and bf16 have no grad scaler


def test_workspace_spec_builds_without_network(tiny_sweep):
    spec = workspace(tiny_sweep, entity="someone")
    group = load_runs(tiny_sweep)[0].wandb["group"]
    assert spec.project == "lightning_seg" and group in spec.name
    assert [s.name for s in spec.sections] == [
        "Validation Dice vs training time",
        "Time to accuracy",
        "Step phases and peak memory",
        "Loss scale",
        "Segmentations",
    ]
    markdown = spec.sections[1].panels[0].markdown
    assert "fp32" in markdown and "bf16 AMP" in markdown and "Equal accuracy" in markdown
    assert spec.sections[4].panels[0].media_keys == ["val_images"]
    view = spec._to_model()  # what save() would upload
    assert [key.name for key in view.spec.section.run_sets[0].grouping] == ["precision.value"]
