"""Devices and processes: which device a run uses, and DistributedDataParallel's process group —
launched by `torch.distributed.run` (the train_student stage relaunches itself), NCCL on GPUs, gloo on CPU."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from kd_core.errors import UserError


def pick_device(name: str) -> torch.device:
    """`auto` prefers CUDA, then Apple MPS, then CPU, so one config runs on any machine.

    Under torchrun each process takes the GPU of its LOCAL_RANK.
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank)
    if name == "auto":
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    return torch.device(name)


def launched() -> bool:
    """True in a process that torchrun started: it sets LOCAL_RANK in each, so they never relaunch."""
    return "LOCAL_RANK" in os.environ


def launch(nproc: int, args: list[str], cwd: Path) -> None:
    """Run `python -m torch.distributed.run --standalone --nproc-per-node N ARGS` in `cwd` and wait.

    The ranks' stdout (each would print the stage summary) is dropped; their stderr, with any
    error, reaches the user. torchrun gives each rank one CPU thread unless OMP_NUM_THREADS is set.
    """
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    rc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, check=False).returncode
    if rc != 0:
        raise UserError(f"training on {nproc} processes (torch.distributed.run) failed with exit code {rc}; "
                        "the ranks' errors are above")


@contextmanager
def process_group(device_name: str) -> Iterator[tuple[int, int]]:
    """Join the process group torchrun described in the environment; yields (rank, world size).

    NCCL on GPUs, gloo on CPU. Outside torchrun (WORLD_SIZE unset or 1) it does nothing: (0, 1).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield ranks()
        return
    device = pick_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield ranks()
    finally:
        dist.destroy_process_group()


def ranks() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def no_buffer_sync() -> dict[str, Any]:
    """DDP's switch for 'do not re-broadcast buffers every forward': `forward_sync_buffers` where this
    torch has it, else the older `broadcast_buffers` (which also skips the one sync at start-up; every
    rank builds the same buffers from the same rows, so nothing is lost)."""
    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def to_device(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host batch -> device. On CUDA from pinned memory, non-blocking: the copy overlaps queued kernels."""
    t = torch.from_numpy(a)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
