"""Devices and processes: which device a run uses, and DistributedDataParallel's process group —
launched by `torch.distributed.run` (the train_student stage relaunches itself), NCCL on GPUs, gloo on CPU.

On several machines each runs the same command; they meet at a c10d rendezvous. Its ranks come in an
order of torchrun's own (`--node-rank` is ignored by c10d), so the process that writes checkpoints and
outputs is not "rank 0" but local rank 0 of node rank 0 (`writes`), and a checkpoint reaches the
other machines from it (`lead_bytes`): they need not share a filesystem.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from kd_core.errors import UserError

NODE_RANK_ENV = "KD_NODE_RANK"  # overrides train.node_rank on one machine; passed to its ranks


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


@dataclass(frozen=True)
class Plan:
    """This machine's share of a training: `nproc` processes here, on `nnodes` machines that meet at
    `endpoint` (host:port) in the rendezvous `run_id`, this machine being `node_rank` (0 writes)."""

    nproc: int
    nnodes: int = 1
    node_rank: int = 0
    endpoint: str | None = None
    run_id: str = "kd"


def node_rank(configured: int, nnodes: int) -> int:
    """This machine's node rank: $KD_NODE_RANK where set (a per-machine value, so every machine can
    read one params.yaml; e.g. a Kubernetes Indexed Job's index), else `configured` (train.node_rank)."""
    raw = os.environ.get(NODE_RANK_ENV)
    if raw is None:
        return configured
    if not raw.strip().isdigit() or int(raw) >= nnodes:
        raise UserError(f"{NODE_RANK_ENV}={raw!r}: expected a node rank from 0 to {nnodes - 1} "
                        f"(train.nnodes is {nnodes})")
    return int(raw)


def torchrun_command(plan: Plan, args: list[str]) -> list[str]:
    """`python -m torch.distributed.run … ARGS`: standalone on one machine, else a c10d rendezvous at
    the endpoint. No --node-rank (c10d ignores it): the ranks learn theirs from $KD_NODE_RANK."""
    if plan.nnodes == 1:
        where = ["--standalone"]
    else:
        where = [f"--nnodes={plan.nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={plan.endpoint}",
                 f"--rdzv-id={plan.run_id}"]
    return [sys.executable, "-m", "torch.distributed.run", *where, f"--nproc-per-node={plan.nproc}", *args]


def launch(plan: Plan, args: list[str], cwd: Path) -> None:
    """Run `torchrun_command(plan, args)` in `cwd` and wait.

    The ranks' stdout (each would print the stage summary) is dropped; their stderr, with any
    error, reaches the user. torchrun gives each rank one CPU thread unless OMP_NUM_THREADS is set.
    """
    env = os.environ | {NODE_RANK_ENV: str(plan.node_rank)}
    rc = subprocess.run(torchrun_command(plan, args), cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                        check=False).returncode
    if rc == 0:
        return
    if plan.nnodes == 1:
        raise UserError(f"training on {plan.nproc} processes (torch.distributed.run) failed with exit code {rc}; "
                        "the ranks' errors are above")
    raise UserError(f"training on machine {plan.node_rank} of {plan.nnodes} ({plan.nproc} processes each, "
                    f"torch.distributed.run) failed with exit code {rc}, here or on another machine; the errors "
                    "are above; run the command on every machine again to resume from the last checkpoint")


_lead = 0  # the global rank of local rank 0 on node rank 0, while process_group is open


@contextmanager
def process_group(device_name: str, node: int = 0) -> Iterator[tuple[int, int]]:
    """Join the process group torchrun described in the environment; yields (rank, world size).

    NCCL on GPUs, gloo on CPU. Outside torchrun (WORLD_SIZE unset or 1) it does nothing: (0, 1).
    `node` is this machine's node rank: the ranks find the one that writes (`writes`).
    """
    global _lead
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        yield ranks()
        return
    device = pick_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        _lead = _find_lead(node)
        yield ranks()
    finally:
        _lead = 0
        dist.destroy_process_group()


def _find_lead(node: int) -> int:
    """The rank of local rank 0 on node rank 0; exactly one must claim it, or the outputs would be
    written twice or nowhere. Every rank raises the same error, so no rank waits for another."""
    mine = torch.tensor([node, int(os.environ.get("LOCAL_RANK", "0"))], dtype=torch.int64, device=_comm_device())
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    claims = [r for r, t in enumerate(every) if t.tolist() == [0, 0]]
    if len(claims) != 1:
        nodes = sorted({int(t[0]) for t in every})
        raise UserError(f"{len(claims)} processes claim local rank 0 of node rank 0 (node ranks seen: {nodes}): "
                        f"give each machine its own train.node_rank or {NODE_RANK_ENV}, 0 to nnodes - 1")
    return claims[0]


def writes() -> bool:
    """True in the one process that writes checkpoints and outputs: local rank 0 of node rank 0 (every
    process, outside a process group)."""
    return not _grouped() or dist.get_rank() == _lead


def check_same(token: str, what: str) -> None:
    """Refuse a job whose ranks disagree on `token` (a digest of `what` they train on): machines with
    different data or code would otherwise average gradients of different problems without a word."""
    if not _grouped():
        return
    mine = torch.frombuffer(bytearray(hashlib.sha256(token.encode()).digest()), dtype=torch.uint8)  # (32,)
    mine = mine.to(_comm_device())
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    differ = [r for r, t in enumerate(every) if not torch.equal(t, every[_lead])]
    if differ:
        raise UserError(f"{what} differ between machines: ranks {differ} against the writing rank {_lead}; "
                        "give every machine the same project (params.yaml, data, cache, kd_core)")


def lead_bytes(path: Path) -> bytes | None:
    """The file at `path` as the writing process reads it, on every rank (None: it has none). A
    resumed job's machines need not share a filesystem, and every rank restores the same epoch."""
    mine = _read(path) if writes() else None
    if not _grouped():
        return mine
    device = _comm_device()
    size = torch.tensor([-1 if mine is None else len(mine)], dtype=torch.int64, device=device)
    dist.broadcast(size, src=_lead)
    n = int(size.item())
    if n <= 0:
        return None if n < 0 else b""
    buf = (torch.frombuffer(bytearray(mine), dtype=torch.uint8).to(device) if mine is not None
           else torch.empty(n, dtype=torch.uint8, device=device))  # (n,)
    dist.broadcast(buf, src=_lead)
    return mine if mine is not None else buf.cpu().numpy().tobytes()


def _read(path: Path) -> bytes | None:
    """The file's bytes, None when it is missing or cannot be read: the other ranks wait on this one."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        warnings.warn(f"{path}: cannot be read ({exc}); going on without it", stacklevel=3)
        return None


def _grouped() -> bool:
    return dist.is_available() and dist.is_initialized()


def _comm_device() -> torch.device:
    """Where a collective's tensors must live: NCCL moves GPU memory only."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def ranks() -> tuple[int, int]:
    if _grouped():
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
