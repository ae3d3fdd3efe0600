"""The preprocessed store at MSD size, measured as a user meets it (docs/benchmarks/data_store.md).

    python docs/benchmarks/data_store/measure.py WORK_DIR [--cases 24 48] [--old-checkout DIR]

Writes CT phantom folders shaped like MSD Task08_HepaticVessel (512 x 512 x 64 int16 HU at 0.8 x 0.8 x
5 mm) under WORK_DIR, then for each size: the first preprocessing (and, with --old-checkout, the previous
commit's in-memory cache fill of the same cases, side by side), launch to the first training step of a
first and a second `python train.py task=hepatic_vessel ...` run, the peak resident memory of a training
process with a width-4 network that fits two steps and validates one case (one process; the larger of two
DDP processes), patches per second one core draws from the store and from memory (reference and nnU-Net
recipes), and the store's size on disk. Prints a JSON record per measurement and writes
WORK_DIR/data_store.json."""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

ROOT = Path(__file__).resolve().parents[3]
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

SHAPE, SPACING = (512, 512, 64), (0.8, 0.8, 5.0)


def write_phantoms(folder: Path, num_cases: int, unique: int = 5) -> Path:
    """MSD-layout CT phantoms: the synthetic organs in HU (body about 100, air -1000), int16 images.
    `unique` distinct cases (a 512 x 512 x 64 phantom takes a minute to draw on a loaded 2-core machine),
    the others copies of them under their own names: every case is still its own file to preprocess,
    store and read. Cases already written are kept."""
    from lightning_seg.data.synthetic import synthetic_case

    if (folder / "dataset.json").is_file():
        return folder
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    affine, training = np.diag([*SPACING, 1.0]), []
    for case in range(num_cases):
        name = f"hepaticvessel_{case:03d}.nii.gz"
        image, label = folder / "imagesTr" / name, folder / "labelsTr" / name
        if case >= unique and not label.is_file():
            source = f"hepaticvessel_{case % unique:03d}.nii.gz"
            shutil.copyfile(folder / "imagesTr" / source, image)
            shutil.copyfile(folder / "labelsTr" / source, label)
        elif not label.is_file():  # the phantom write_synthetic_msd draws for this case, in HU
            data, labels = synthetic_case(SHAPE, 3, np.random.default_rng([0, case]))
            hu = np.where(data == 0, -1000, data * 100).astype(np.int16)
            nib.save(nib.Nifti1Image(hu, affine), image)
            nib.save(nib.Nifti1Image(labels, affine), label)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    meta = {
        "name": "HepaticVesselPhantom",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "vessel", "2": "tumour"},
        "numTraining": num_cases,
        "training": training,
    }
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))
    return folder


def overrides(data_dir: Path, cache_dir: Path, *extra: str) -> list[str]:
    return [
        "task=hepatic_vessel",
        f"task.msd_folder={data_dir}",
        f"paths.cache_dir={cache_dir}",
        "hardware=cpu",
        *extra,
    ]


def compose_data(argv: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    from lightning_seg.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=argv)
    return instantiate(cfg.data)


def timed_child(argv: list[str]) -> tuple[float, int, str]:
    """(wall seconds, peak resident bytes of the child, its output)."""
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the largest child so far
    if done.returncode:
        raise RuntimeError(f"{argv} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return wall, peak, done.stdout + done.stderr


def peak_rss_of(argv: list[str], run_dir: Path) -> tuple[float, float]:
    """Run `argv` (writing into `run_dir`) under GNU time: (wall s, peak resident GiB of the process and its
    children). A run measured before (the script was stopped after it) is read, not run again."""
    measured = run_dir / "measured.json"
    if not measured.is_file():
        report = Path(tempfile.mkdtemp()) / "time.txt"
        start = time.perf_counter()
        env = {**os.environ, "PYTHONPATH": str(HERE)}  # the first-step callback
        done = subprocess.run(
            ["/usr/bin/time", "-v", "-o", str(report), *argv],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=env,
        )
        wall = time.perf_counter() - start
        if done.returncode:
            raise RuntimeError(f"{argv} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        lines = report.read_text().splitlines()
        kib = next(int(line.split(":")[1]) for line in lines if "Maximum resident" in line)
        measured.write_text(json.dumps({"wall_s": wall, "peak_rss_gib": kib / 2**20}))
    record = json.loads(measured.read_text())
    return record["wall_s"], record["peak_rss_gib"]


def first_step_s(run_dir: Path) -> float:
    return json.loads((run_dir / "first_step.json").read_text())["since_launch_s"]


def train_argv(data_dir, cache_dir, run_dir, *extra, first_step: bool = False) -> list[str]:
    """`python train.py` on the phantom folder; `first_step`: record launch to first step, then end."""
    callback = [
        "+callbacks.first_step._target_=first_step.FirstStep",
        f"+callbacks.first_step.out={run_dir / 'first_step.json'}",
    ]
    return [
        sys.executable,
        "train.py",
        *overrides(data_dir, cache_dir),
        f"hydra.run.dir={run_dir}",
        "logger=csv",
        "trainer.num_sanity_val_steps=0",  # a whole-volume sliding window takes a minute on a CPU
        *(callback if first_step else []),
        *extra,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--cases", type=int, nargs="+", default=[24, 48])
    parser.add_argument("--old-checkout", type=Path, help="the previous commit's checkout: its cache fill")
    parser.add_argument("--skip", nargs="*", default=[], help="parts to leave out: ddp, old, rates")
    args = parser.parse_args()
    work = args.work_dir.resolve()
    records = []

    def record(**fields):
        print(json.dumps(fields), flush=True)
        records.append(fields)

    for n in args.cases:
        data = write_phantoms(work / f"hepatic_{n}" / "Task08_HepaticVessel", n)
        cache = work / f"cache_{n}"
        if args.old_checkout and "old" not in args.skip and n == args.cases[0]:  # the previous cache fill
            old = [sys.executable, str(HERE / "prepare_time.py"), str(args.old_checkout)]
            wall, peak, out = timed_child([*old, *overrides(data, work / f"old_cache_{n}")])
            record(cases=n, what="previous commit: dataset check + CacheDataset fill (train + val)",
                   seconds=float(out.split()[-1]), wall_s=wall)  # fmt: skip
        # the first run preprocesses, the second reads the store; both stop at their first step
        for attempt in ("first", "second"):
            run = work / f"runs_{n}" / attempt
            argv = train_argv(data, cache, run, "+trainer.limit_val_batches=0", first_step=True)
            wall, peak_gib = peak_rss_of(argv, run)
            record(cases=n, what=f"{attempt} run: launch to first training step", seconds=first_step_s(run),
                   wall_s=wall, peak_rss_gib=peak_gib)  # fmt: skip
        store = json.loads((work / f"runs_{n}" / "second" / "environment.json").read_text())["data"]
        size = sum(p.stat().st_size for p in Path(store["store"]).rglob("*") if p.is_file())
        raw = sum(p.stat().st_size for p in data.rglob("*.nii.gz"))
        record(cases=n, what="store on disk", store_gib=size / 2**30, raw_nifti_gib=raw / 2**30, data=store)
        # fit with validation: two steps, one validation case, in one process and in two DDP processes, with a
        # width-4 network: what a process holds besides the U-Net's activations (the default network's
        # 128^3 step alone peaks at 9.3 GiB on a CPU and takes minutes there)
        fit = ["trainer.max_steps=2", "+trainer.limit_val_batches=1", "+trainer.val_check_interval=2"]
        fit += ["trainer.check_val_every_n_epoch=null", "model.width=4"]
        runs = [("fit_width4", [], "one process")]
        if (
            "ddp" not in args.skip and n == args.cases[0]
        ):  # ddp_spawn: launcher and two processes; the largest
            runs.append(("ddp_width4", ["hardware=ddp_cpu"], "2 DDP processes (the largest)"))
        for name, extra, what in runs:
            run = work / f"runs_{n}" / name
            wall, peak_gib = peak_rss_of(train_argv(data, cache, run, *fit, *extra), run)
            record(cases=n, what=f"fit 2 steps + validate 1 case, {what}", peak_rss_gib=peak_gib, wall_s=wall)
        if "rates" not in args.skip and n == args.cases[0]:
            rates = [sys.executable, str(HERE / "patch_rates.py"), *overrides(data, cache)]
            _, _, out = timed_child(rates)
            for line in out.splitlines():
                if line.startswith("{"):
                    record(cases=n, **json.loads(line))
    (work / "data_store.json").write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
