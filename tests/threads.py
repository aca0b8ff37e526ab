"""Two pytest-xdist workers share the machine's cores.

Every stage a test runs is a process of its own, and torch (and OpenMP/BLAS under numpy) starts one
thread per core in each. With two workers on two cores that is four busy threads on two cores, and
OpenMP's spinning threads then wait on descheduled ones (a tiny text teacher's fine-tuning: 42 s with
two threads next to a busy process, 7 s with one; an image net's test 34 s against 0.6 s). Each worker's
processes get their share of the cores instead (OMP_NUM_THREADS, inherited by every subprocess; torch in
the worker itself too).
Tests that need a thread count of their own still set it.
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config: pytest.Config) -> None:
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    share = max(1, (os.cpu_count() or 1) // workers)
    os.environ["OMP_NUM_THREADS"] = str(share)
    import torch

    torch.set_num_threads(share)
