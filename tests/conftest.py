"""Shared test set-up: one thread per pytest-xdist worker.

pytest.ini runs the suite with `-n auto`, one worker process per core. Each worker left at torch's
default would start one OpenMP thread per core, and k workers × k threads on k cores spend more
time waiting on each other than computing (measured on 2 cores: 399 s with default threads, 164 s
with one thread per worker, 218 s serial). So a worker uses one thread, and so do the scripts the
tests start as subprocesses (they inherit OMP_NUM_THREADS). A plain serial run (`-n 0`) is left
as it is."""
import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
