"""hardware=ddp_multinode for real: two hosts made of two network namespaces joined by a veth pair, one
torchrun per host as the README launches it, a rendezvous across their addresses, a lost host, a resume."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch

from .conftest import ROOT, learnable_synthetic_overrides
from .test_distributed import COUNTER, validate_with

ADDRESSES = ("10.200.30.1", "10.200.30.2")  # private, and only inside the two namespaces
PORT = 29530
EPOCHS = 6
TIMEOUT_S = 30  # trainer.strategy.timeout here: the longest a host waits for a lost one at a collective
STOP_WITHIN_S = 60  # a host whose peer is lost or hung exits this long after the loss or the timeout


@pytest.fixture
def two_hosts(request) -> list[str]:
    """Two network namespaces, `eth0` in each (one veth pair), ADDRESSES; removed with what runs there."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("two hosts as network namespaces need root and iproute2's ip")
    tag = f"ls{os.getpid() % 100000}"
    hosts = [f"{tag}h0", f"{tag}h1"]

    def remove() -> None:
        for host in hosts:
            kill_host(host)
            subprocess.run(["ip", "netns", "del", host], capture_output=True)

    request.addfinalizer(remove)
    ends = [f"{tag}a", f"{tag}b"]
    commands = [
        *[["ip", "netns", "add", host] for host in hosts],
        ["ip", "link", "add", ends[0], "type", "veth", "peer", "name", ends[1]],
    ]
    for host, end, address in zip(hosts, ends, ADDRESSES, strict=True):
        commands += [
            ["ip", "link", "set", end, "netns", host],
            ["ip", "-n", host, "link", "set", end, "name", "eth0"],
            ["ip", "-n", host, "addr", "add", f"{address}/24", "dev", "eth0"],
            ["ip", "-n", host, "link", "set", "eth0", "up"],
            ["ip", "-n", host, "link", "set", "lo", "up"],
        ]
    for command in commands:
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot make two hosts: {' '.join(command)}: {done.stderr.strip()}")
    return hosts


def kill_host(host: str) -> None:
    """SIGKILL to every process in the host's namespace: only what this test started there."""
    for pid in subprocess.run(["ip", "netns", "pids", host], capture_output=True, text=True).stdout.split():
        os.kill(int(pid), signal.SIGKILL)


def launch(hosts: list[str], tmp_path: Path, name: str, overrides: list[str]) -> list[subprocess.Popen]:
    """On each host: `torchrun --nnodes=2 --node-rank=N --master-addr=HOST0 ... train.py
    hardware=ddp_multinode ...`; each its own data and cache dirs (node-local scratch), one run dir."""
    (tmp_path / "hook").mkdir(exist_ok=True)
    (tmp_path / "hook" / "sitecustomize.py").write_text(COUNTER)
    started = []
    for node, host in enumerate(hosts):
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(tmp_path / "hook"), str(ROOT)]),
            "LIGHTNING_SEG_TEST_COUNTER": str(tmp_path / f"{name}-calls-node{node}.txt"),
            "GLOO_SOCKET_IFNAME": "eth0",  # the interface the hosts reach each other on
            "OMP_NUM_THREADS": "1",  # two hosts share this machine's cores
        }
        command = [
            *["ip", "netns", "exec", host],
            str(Path(sys.executable).parent / "torchrun"),
            *["--nnodes=2", "--nproc-per-node=1", f"--node-rank={node}"],
            *[f"--master-addr={ADDRESSES[0]}", f"--master-port={PORT}"],
            str(ROOT / "train.py"),
            *learnable_synthetic_overrides(),
            *["hardware=ddp_multinode", "trainer.accelerator=cpu", "trainer.devices=1"],
            f"trainer.strategy.timeout.minutes={TIMEOUT_S / 60}",
            f"trainer.max_epochs={EPOCHS}",
            f"paths.data_dir={tmp_path / f'node{node}' / 'data'}",
            f"paths.cache_dir={tmp_path / f'node{node}' / 'cache'}",
            f"hydra.run.dir={tmp_path / 'run'}",
            *overrides,
        ]
        log = open(tmp_path / f"{name}-node{node}.log", "w")  # noqa: SIM115 - the Popen keeps it
        started.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    return started


def wait_for(condition, what: str, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout_s} s: {what}")
        time.sleep(0.2)


def calls(tmp_path: Path, name: str, node: int) -> list[str]:
    return (tmp_path / f"{name}-calls-node{node}.txt").read_text().split()[::2]


def log_tail(tmp_path: Path, name: str) -> str:
    return "\n".join((tmp_path / f"{name}-node{n}.log").read_text()[-2000:] for n in (0, 1))


def rank_one(launched: list[subprocess.Popen]) -> psutil.Process:
    """Host 1's training process: the child of its torchrun (`ip netns exec` runs torchrun in its place)."""
    (worker,) = psutil.Process(launched[1].pid).children()
    return worker


def stopped_within(launched: subprocess.Popen, seconds: float, since: float, log: str) -> float:
    assert launched.wait(timeout=seconds) != 0, log
    return time.monotonic() - since


def test_two_hosts_train_lose_one_and_resume(two_hosts, tmp_path):
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"

    def a_new_last_ckpt(launched: list[subprocess.Popen], since: float) -> None:
        wait_for(
            lambda: (
                (last.is_file() and last.stat().st_mtime > since)
                or any(p.poll() is not None for p in launched)
            ),
            "a new last.ckpt",
        )

    # rank 1 killed: its connections close, host 0 stops at its next collective
    first = launch(two_hosts, tmp_path, "first", [])
    a_new_last_ckpt(first, 0)
    assert all(p.poll() is None for p in first), log_tail(tmp_path, "first")
    rank_one(first).kill()
    killed_s = stopped_within(first[0], STOP_WITHIN_S, time.monotonic(), log_tail(tmp_path, "first"))
    assert first[1].wait(timeout=STOP_WITHIN_S) != 0  # host 1's torchrun reports its lost process
    kept = pd.read_csv(run / "csv" / "metrics.csv")
    resumed_from = torch.load(last, map_location="cpu", weights_only=True)["global_step"]

    # resumed, then rank 1 hangs (a host gone silent): host 0 waits trainer.strategy.timeout, then stops
    second_at = time.time()
    second = launch(two_hosts, tmp_path, "second", ["ckpt_path=last"])
    a_new_last_ckpt(second, second_at)
    assert all(p.poll() is None for p in second), log_tail(tmp_path, "second")
    hung = rank_one(second)
    hung.suspend()
    hung_s = stopped_within(
        second[0], TIMEOUT_S + STOP_WITHIN_S, time.monotonic(), log_tail(tmp_path, "second")
    )
    assert "Timed out" in (tmp_path / "second-node0.log").read_text()  # gloo's timeout, not a closed peer
    hung.kill()
    assert second[1].wait(timeout=STOP_WITHIN_S) != 0

    third = launch(two_hosts, tmp_path, "third", ["ckpt_path=last"])
    for process in third:
        assert process.wait(timeout=600) == 0, log_tail(tmp_path, "third")
    print(f"host 0 stopped {killed_s:.1f} s after rank 1 was killed, {hung_s:.1f} s after it hung")

    launches = ("first", "second", "third")
    for name in launches:  # each node prepared its data once per launch
        for node in (0, 1):
            assert calls(tmp_path, name, node).count("check") == 1, (name, node)
    assert calls(tmp_path, "first", 0).count("write") == calls(tmp_path, "first", 1).count("write") == 1
    # global rank 0 alone writes the run dir; rank 1 only its log and node 1's data verdicts
    assert (run / "train_ddp_process_1.log").is_file() and not (run / "train_ddp_process_0.log").exists()
    assert len(list(run.glob(".prepared-torchrun*-node1"))) == len(launches)
    for log_name in ("train.log", "train_ddp_process_1.log"):  # one line per launch in each process' log
        assert (run / log_name).read_text().count("patches per optimizer step") == len(launches), log_name
    log = pd.read_csv(run / "csv" / "metrics.csv")
    validations = log[log["val/dice"].notna()]
    assert list(validations["epoch"]) == list(range(EPOCHS))
    assert log["step"].is_monotonic_increasing
    before = kept[kept["step"] < resumed_from].reset_index(drop=True)
    pd.testing.assert_frame_equal(log.iloc[: len(before)][before.columns], before)

    (best,) = (run / "checkpoints").glob("best-*.ckpt")
    one = validate_with(tmp_path, "one", best, "cpu")
    assert validations["val/dice"].max() > 0.2  # a trained network: the comparison means something
    assert one["val/dice"] == pytest.approx(validations["val/dice"].max(), abs=1e-5)
