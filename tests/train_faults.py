"""Fault injection for the train stage, loaded by Ray Train workers through ``train.epoch_hook``
(importable there because tests/conftest.py puts tests/ on the PYTHONPATH Ray inherits)."""

import os
import signal

#: Which worker dies, after which epoch's report, on the run's first attempt only.
KILL_RANK, KILL_AFTER_EPOCH = 1, 2


def kill_worker_once(*, epoch: int, rank: int, attempt: int) -> None:
    """SIGKILL this worker process (no cleanup, like a lost node) after epoch 2 of attempt 0.

    Gated on the attempt number the loop reads back from its checkpoint, so the resumed
    worker group (attempt 1) trains on instead of dying again."""
    if attempt == 0 and rank == KILL_RANK and epoch == KILL_AFTER_EPOCH:
        os.kill(os.getpid(), signal.SIGKILL)
