"""Through a real one-node SLURM (tests/cluster/start_slurm.sh): a submitit sweep, a 2-task DDP job, a requeue
at the time-limit signal, and the README's plain sbatch recipe. Each job trains a tiny task for seconds; all
are submitted at once (the node runs them side by side), so the module takes about its longest job."""

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch

from .conftest import ROOT, learnable_synthetic_overrides, tiny_synthetic_overrides
from .test_distributed import validate_with

START_SLURM = ROOT / "tests" / "cluster" / "start_slurm.sh"
SWEEP_SEEDS = (0, 1, 2)
EPOCHS = 8  # of the signalled jobs: they still train when the signal comes
SIGNALLED = ("early", "trained")  # signalled once the job checked its data, or once it wrote last.ckpt
JOB_TIMEOUT_S = 600  # a job's own run is seconds; a requeue waits cred_expire (10 s) on top
# the test node does not pin tasks to cores (TaskPlugin=task/none): one thread each, or they oversubscribe
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="session")
def slurm() -> None:
    """A running one-node SLURM: started (or found running) by the script CI runs with --install."""
    started = subprocess.run(["bash", str(START_SLURM)], capture_output=True, text=True, timeout=120)
    if started.returncode == 77:
        pytest.skip(started.stderr.strip())
    assert started.returncode == 0, started.stderr


def wait_for(condition: Callable[[], object], what: str, timeout_s: float = JOB_TIMEOUT_S) -> object:
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.2)
    return result


def paths(tmp_path: Path) -> list[str]:
    return [f"paths.{key}_dir={tmp_path / key}" for key in ("data", "cache", "log")]


def metrics(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "csv" / "metrics.csv")


def global_step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]


@dataclass
class Submitted:
    tmp: Path
    run: Path  # the (first) run dir
    launcher: subprocess.Popen | None = None  # `train.py -m`: it waits for its jobs
    signalled: Future | None = None  # (job id, the metrics rows a resume keeps), once the signal is sent

    def finish(self) -> None:
        assert self.launcher.wait(timeout=JOB_TIMEOUT_S) == 0, (self.tmp / "sweep.log").read_text()[-3000:]

    def job_ids(self) -> list[str]:
        return [log.name.removesuffix("_0_log.out") for log in self.tmp.glob("**/*_0_log.out")]


def submit_sweep(tmp_path: Path, overrides: list[str]) -> Submitted:
    """`python train.py -m hydra/launcher=slurm ...` as a user runs it."""
    sweep = tmp_path / "sweep"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=10",
        f"hydra.sweep.dir={sweep}",
        *paths(tmp_path),
        *overrides,
    ]
    log = open(tmp_path / "sweep.log", "w")  # noqa: SIM115 - the Popen keeps it
    launcher = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path, env=ENV)
    return Submitted(tmp_path, sweep / "0", launcher)


def readme_sbatch_script() -> str:
    """The README's sbatch recipe, as written there."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    (script,) = [block for block in blocks if "#SBATCH --requeue" in block]
    return script


README_COMMAND = "python train.py task=liver precision=16"  # the part of the recipe the test replaces


def submit_readme_recipe(tmp_path: Path) -> tuple[Submitted, str]:
    overrides = [*tiny_synthetic_overrides(), f"trainer.max_epochs={EPOCHS}", *paths(tmp_path)]
    ours = " ".join([sys.executable, str(ROOT / "train.py"), *overrides])
    (tmp_path / "job.sh").write_text(readme_sbatch_script().replace(README_COMMAND, ours))
    job = subprocess.run(
        ["sbatch", "--parsable", f"--output={tmp_path / 'slurm-%j.out'}", "job.sh"],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return Submitted(tmp_path, tmp_path / "outputs" / "runs" / f"slurm-{job}"), job  # the recipe's run dir


def rows_before(run: Path, ckpt: Path) -> pd.DataFrame:
    """The metrics rows a resume from `ckpt` keeps (re-read after the checkpoint is whole)."""
    log = metrics(run)
    return log[log["step"] < global_step(ckpt)].reset_index(drop=True)


def signal_when(submitted: Submitted, signal: str, job: Callable[[], str], trained: bool):
    """Send `signal` once the job has checked its data (`trained`: once it has written last.ckpt); return the
    job id and the metrics rows a resume keeps (None before any checkpoint)."""
    last = submitted.run / "checkpoints" / "last.ckpt"
    if trained:
        wait_for(last.is_file, f"{submitted.run}: the first last.ckpt")
    else:
        wait_for(lambda: list(submitted.run.glob(".prepared-*")), f"{submitted.run}: the data checked")
    kept = rows_before(submitted.run, last) if trained else None
    subprocess.run(["scancel", f"--signal={signal}", job()], check=True)
    return job(), kept


@pytest.fixture(scope="module")
def submitted(slurm, tmp_path_factory) -> Iterator[dict[str, Submitted]]:
    """Every job of the module, submitted at once; the signalled ones signalled from threads (signal_when)."""
    seeds = ",".join(map(str, SWEEP_SEEDS))
    jobs = {
        "sweep": submit_sweep(
            tmp_path_factory.mktemp("sweep"),
            [*tiny_synthetic_overrides(), "trainer.max_epochs=1", f"seed={seeds}"],
        ),
        "ddp": submit_sweep(
            tmp_path_factory.mktemp("ddp"),
            [
                *learnable_synthetic_overrides(),
                "trainer.devices=2",  # SLURM tasks: hydra.launcher.tasks_per_node follows trainer.devices
                "trainer.strategy=ddp",
                "trainer.max_epochs=3",
            ],
        ),
        # a user error in the job (no such data folder): submitit gets no result from a job that exits
        "broken": submit_sweep(tmp_path_factory.mktemp("broken"), ["task=hippocampus", "hardware=cpu"]),
        **{
            f"requeue_{when}": submit_sweep(
                tmp_path_factory.mktemp(f"requeue_{when}"),
                [*tiny_synthetic_overrides(), f"trainer.max_epochs={EPOCHS}"],
            )
            for when in SIGNALLED
        },
    }
    jobs["sbatch"], sbatch_job = submit_readme_recipe(tmp_path_factory.mktemp("sbatch"))
    with ThreadPoolExecutor() as pool:
        for when in SIGNALLED:
            requeue = jobs[f"requeue_{when}"]
            # the signal submitit's sbatch asks for before the time limit (--signal=USR2@120), sent now
            requeue.signalled = pool.submit(
                signal_when, requeue, "USR2", lambda r=requeue: r.job_ids()[0], when == "trained"
            )
        # what the recipe's --signal=SIGUSR1@120 sends
        jobs["sbatch"].signalled = pool.submit(signal_when, jobs["sbatch"], "USR1", lambda: sbatch_job, True)
        yield jobs
        for job in [sbatch_job, *(i for s in jobs.values() for i in s.job_ids())]:  # a failed test's jobs
            subprocess.run(["scancel", job], capture_output=True)
        for each in jobs.values():
            if each.launcher is not None and each.launcher.poll() is None:
                each.launcher.kill()


def test_a_point_with_a_user_error_ends_the_sweep_with_its_message(submitted):
    """Without SLURM accounting (this cluster has none) submitit would wait forever for a job that exits."""
    broken = submitted["broken"]
    assert broken.launcher.wait(timeout=JOB_TIMEOUT_S) != 0
    log = (broken.tmp / "sweep.log").read_text()
    assert f"{broken.tmp / 'data' / 'Task04_Hippocampus'}: no such folder" in log, log[-3000:]


def test_a_sweep_runs_one_slurm_job_per_point(submitted):
    sweep = submitted["sweep"]
    sweep.finish()
    assert len(set(sweep.job_ids())) == len(SWEEP_SEEDS)  # one SLURM job (an array's task) per point
    for number, seed in enumerate(SWEEP_SEEDS):
        run = sweep.tmp / "sweep" / str(number)
        assert f"seed={seed}" in (run / ".hydra" / "overrides.yaml").read_text()
        assert metrics(run)["val/dice"].notna().sum() == 1
        assert list(run.glob(".prepared-slurm*-node0"))  # prepared inside a SLURM job


def test_a_two_task_ddp_job_validates_as_one_process(submitted):
    ddp = submitted["ddp"]
    ddp.finish()
    (best,) = (ddp.run / "checkpoints").glob("best-*.ckpt")
    logged = metrics(ddp.run)["val/dice"].max()
    assert logged > 0.2  # a trained network: the comparison means something
    one = validate_with(ddp.tmp, "one", best, "cpu")
    assert (one["processes"], one["cases"]) == (1, 3)
    assert one["val/dice"] == pytest.approx(logged, abs=1e-5)
    for log_name in ("train.log", "train_ddp_process_1.log"):  # rank 0's log and rank 1's, beside it
        assert (ddp.run / log_name).read_text().count("patches per optimizer step") == 1, log_name


def job_state(job: str) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True, check=True)
    return dict(re.findall(r"(\w+)=(\S+)", shown.stdout))


def assert_continued(run: Path, epochs: int, kept: pd.DataFrame | None) -> None:
    """The run ended at its full length in its own dir, its metrics rows continued, one best checkpoint."""
    log = metrics(run)
    validations = log[log["val/dice"].notna()]
    assert list(validations["epoch"]) == list(range(epochs))  # each epoch validated once, none lost
    assert log["step"].is_monotonic_increasing  # no step twice: rows the resume trains again were dropped
    if kept is not None:  # rows before the signal kept, the run continued from its checkpoint
        pd.testing.assert_frame_equal(log.iloc[: len(kept)][kept.columns], kept)
        assert "SLURM job restarted: continuing" in (run / "train.log").read_text()
    assert global_step(run / "checkpoints" / "last.ckpt") == log["step"].max() + 1
    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    assert f"dice{validations['val/dice'].max():.4f}" in best.name


@pytest.mark.parametrize("when", SIGNALLED)
def test_a_job_signalled_for_its_time_limit_is_requeued_into_its_run_dir(submitted, when):
    requeue = submitted[f"requeue_{when}"]
    job, kept = requeue.signalled.result(timeout=JOB_TIMEOUT_S)
    requeue.finish()
    assert job_state(job)["Restarts"] == "1"
    assert_continued(requeue.run, EPOCHS, kept)


def test_the_readme_sbatch_recipe_requeues_at_its_signal_and_continues(submitted):
    script = readme_sbatch_script()
    assert "#SBATCH --signal=SIGUSR1@120" in script and README_COMMAND in script
    sbatch = submitted["sbatch"]
    job, kept = sbatch.signalled.result(timeout=JOB_TIMEOUT_S)
    state = wait_for(lambda: (s := job_state(job))["JobState"] in ("COMPLETED", "FAILED") and s, "job end")
    output = (sbatch.tmp / f"slurm-{job}.out").read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", output[-3000:]
    assert (sbatch.run / "hpc_ckpt_1.ckpt").is_file()
    assert_continued(sbatch.run, EPOCHS, kept)
