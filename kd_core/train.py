"""The training loop shared by teacher, student and baseline.

Rows stay in memory as one tensor; the teacher's logits come from the cache by row number, so the
student never runs the teacher. The loop knows nothing of KD: the loss function decides.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

LossFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]
SoftLabels = Callable[[np.ndarray], np.ndarray]  # row numbers (B,) -> teacher logits (B, K)
EpochHook = Callable[[dict[str, float]], None]


@dataclass(frozen=True)
class FitConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    device: str = "auto"


def pick_device(name: str) -> torch.device:
    """`auto` prefers CUDA, then Apple MPS, then CPU, so one config runs on any machine."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def fit(model: nn.Module, x: np.ndarray, y: np.ndarray, loss_fn: LossFn, cfg: FitConfig,
        soft: SoftLabels | None = None, on_epoch: EpochHook | None = None) -> list[dict[str, float]]:
    """Train `model` in place on rows `x` (N, F) with labels `y` (N,), -1 marking unlabelled rows.

    Returns one dict of metrics per epoch (also passed to `on_epoch`): mean loss, accuracy on the
    labelled rows seen, and agreement with the teacher when soft labels are given.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = pick_device(cfg.device)
    model.to(device).train()
    xt = torch.from_numpy(np.ascontiguousarray(x)).to(device)  # (N, F)
    yt = torch.from_numpy(np.ascontiguousarray(y)).to(device)  # (N,)
    steps_per_epoch = -(-len(x) // cfg.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs * steps_per_epoch)
    history = []
    for epoch in range(1, cfg.epochs + 1):
        t0, perm = time.perf_counter(), rng.permutation(len(x))
        total = correct = labelled = agree = 0.0
        for start in range(0, len(x), cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]  # (B,)
            tb = torch.from_numpy(soft(idx)).to(device) if soft is not None else None  # (B, K)
            xb, yb = xt[idx], yt[idx]
            out = model(xb)  # (B, K)
            loss = loss_fn(out, tb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                pred = out.argmax(-1)
                mask = yb >= 0
                total += loss.item() * len(idx)
                correct += (pred[mask] == yb[mask]).sum().item()
                labelled += mask.sum().item()
                if tb is not None:
                    agree += (pred == tb.argmax(-1)).sum().item()
        row = {"epoch": float(epoch), "loss": total / len(x),
               "accuracy": correct / max(labelled, 1), "seconds": time.perf_counter() - t0}
        if soft is not None:
            row["agreement_with_teacher"] = agree / len(x)
        history.append(row)
        if on_epoch is not None:
            on_epoch(row)
    model.cpu().eval()
    return history
