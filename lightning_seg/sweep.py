"""A multirun sweep outlives a diverged run. Hydra's launcher ends a sweep at its first failing job, yet for a
precision study a run whose loss turned non-finite is a result: in a multirun the task function records it
(the run's `diverged.json`) and returns, and once every job has run, `DivergedRuns` names the runs that
diverged and exits 2, the code a single diverged run exits with."""

import json
import sys
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from lightning_seg.entry import EXIT_USER_ERROR, report
from lightning_seg.run_dir import RunDir


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (`python train.py -m ...`)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


class DivergedRuns(Callback):
    """Hydra callback: after a multirun's last job, the diverged runs, one `error:` line and exit code 2."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        runs = [RunDir(config.parent.parent) for config in sorted(sweep_dir.glob("**/.hydra/config.yaml"))]
        diverged = [run for run in runs if run.diverged_json.is_file()]
        if not diverged:
            return
        for run in diverged:
            print(f"{run.path}: {json.loads(run.diverged_json.read_text())['error']}", file=sys.stderr)
        report(f"{len(diverged)} of {len(runs)} runs diverged (listed above; the others ran) in {sweep_dir}")
        sys.exit(EXIT_USER_ERROR)
