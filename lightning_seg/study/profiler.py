"""A Lightning profiler that measures one thing: how long training waits for its next batch."""

import time

from pytorch_lightning.profilers import Profiler

# the action Lightning's training loop wraps around `next(train_dataloader)` (host to device excluded): the
# one Lightning internal the package names (its loop's class name; pytorch-lightning 2.6.6 checked, and
# tests/test_bench.py fails if the name changes and no wait is counted)
FETCH_ACTION = "[_TrainingEpochLoop].train_dataloader_next"


class DataWaitProfiler(Profiler):
    """Seconds inside the training loader's `next()`; any other action costs one string comparison."""

    def __init__(self) -> None:
        super().__init__()
        self.data_wait_s, self.fetches, self._start = 0.0, 0, None

    def start(self, action_name: str) -> None:
        if action_name == FETCH_ACTION:
            self._start = time.perf_counter()

    def stop(self, action_name: str) -> None:
        if action_name == FETCH_ACTION and self._start is not None:
            self.data_wait_s += time.perf_counter() - self._start
            self.fetches += 1
            self._start = None

    def summary(self) -> str:
        return f"training data wait: {self.data_wait_s:.2f} s over {self.fetches} batches"
