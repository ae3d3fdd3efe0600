"""Which process this is before the Trainer exists, and data preparation once per node: the dataset check,
download and precision=auto's probe run in local rank 0, the others (started with it, or by `ddp` at fit)
wait for its verdict, so a broken dataset stops all with one message and all train in one precision."""

import json
import logging
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_fabric.plugins.environments import (
    ClusterEnvironment,
    LightningEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)

from lightning_seg.errors import UserError
from lightning_seg.run_dir import write_atomic

log = logging.getLogger(__name__)

OK = "ok"
TIMEOUT_S = 24 * 3600


def in_slurm_job() -> bool:
    """Whether srun started this process: Lightning's test, without the warning it gives on a machine where
    srun exists but started nothing (a login node; the Trainer gives it once, if the user needs it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The `srun` command is available")
        return SLURMEnvironment.detect()


def launch_environment() -> ClusterEnvironment:
    """The environment Lightning will detect: SLURM, torchrun, else its own launcher's variables."""
    if in_slurm_job():
        return SLURMEnvironment(auto_requeue=False)  # only read here: the Trainer makes its own
    if TorchElasticEnvironment.detect():
        return TorchElasticEnvironment()
    return LightningEnvironment()


def launch_id() -> str:
    """Shared by all processes of one launch, different for the next one (a SLURM requeue)."""
    if "SLURM_JOB_ID" in os.environ:
        return f"slurm{os.environ['SLURM_JOB_ID']}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    if TorchElasticEnvironment.detect():
        # a node's workers are children of its torchrun agent; TORCHELASTIC_RUN_ID is `none` unless given,
        # and the same for a relaunch into the run dir, whose old markers local rank 0 has not replaced yet
        return f"torchrun{os.getppid()}.{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    # a plain launch: the other ranks start after local rank 0 has prepared, the marker is fresh
    return "local"


def prepare_once_per_node(prepare: Callable[[], Any], marker_dir: Path, name: str = "prepared") -> Any:
    """Run `prepare` in the node's local rank 0 process; the others wait and fail with its message if it
    failed. Every process returns what it returned (JSON-able)."""
    env = launch_environment()
    marker = marker_dir / f".{name}-{launch_id()}-node{env.node_rank()}"
    if env.local_rank() == 0:
        try:
            result = prepare()
        except UserError as err:
            write_atomic(marker, str(err))  # whole or absent: a waiting process never reads half of it
            raise
        except BaseException:
            write_atomic(marker, f"data preparation failed in local rank 0: see its log in {marker_dir}")
            raise
        write_atomic(marker, f"{OK}\n{json.dumps(result)}")
        return result
    log.info("local rank %d: waiting for local rank 0 (%s)", env.local_rank(), marker)
    deadline = time.monotonic() + TIMEOUT_S
    while not marker.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"local rank 0 did not finish preparing the data within {TIMEOUT_S:.0f} s")
        time.sleep(1.0)
    verdict, _, result = marker.read_text().partition("\n")
    if verdict != OK:
        raise UserError(marker.read_text())
    return json.loads(result)
