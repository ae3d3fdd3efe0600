"""A sweep point that submitit requeues at its time-limit signal reports nothing from the stopped attempt.

submitit's signal handler requeues the job and raises SystemExit wherever the signal lands. Inside library
code (OmegaConf's node flags, seen in the requeue test) the half-done operation can surface as an ordinary
error instead; Hydra returns that as the job's result, and the sweep took it as the point's outcome while
the requeued job went on training. After a requeue, the stopped attempt exits, whatever happened since."""

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager

# set in the job script submitit writes; the signal is submitit's default unless the user changed it
_EXECUTOR, _SIGNAL = "SUBMITIT_EXECUTOR", "SUBMITIT_PREEMPT_SIGNAL"


@contextmanager
def exit_if_requeued() -> Iterator[None]:
    """Around the task function of a submitit SLURM job: once submitit requeued it, leave with SystemExit."""
    signum = getattr(signal, f"SIG{os.environ.get(_SIGNAL, 'USR2')}")
    submitit_handler = signal.getsignal(signum)
    if os.environ.get(_EXECUTOR) != "slurm" or not callable(submitit_handler):
        yield
        return
    requeued = False

    def handler(number, frame):
        nonlocal requeued
        try:
            submitit_handler(number, frame)
        except SystemExit:  # requeued; where it does not requeue it raises another error (rank > 0: returns)
            requeued = True
            raise

    signal.signal(signum, handler)
    try:
        yield
    finally:
        signal.signal(signum, submitit_handler)
        if requeued:
            raise SystemExit(-1)  # what submitit exits with: no result from this attempt
