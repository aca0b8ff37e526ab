"""The training loop shared by teacher, student and baseline: device, AMP, DDP, checkpoints.

Rows and labels sit on the training device as one tensor each (on CPU sharing the arrays' memory,
on a GPU copied there once) and each step indexes its batch by row number; the teacher's logits
for the same row numbers come from the memory-mapped cache, so the student never runs the teacher.
The loop knows nothing of KD: the loss function decides.

- Devices: `auto` picks CUDA, then MPS, then CPU. On CUDA the forward pass runs under bf16 autocast
  and each batch's row numbers and cached logits travel from pinned memory with non-blocking
  copies; elsewhere the same code runs with those switched off. `compile` wraps the model in
  torch.compile.
- Distributed: inside a process group (set up by `process_group` under torchrun) the model is
  wrapped in DistributedDataParallel and every rank takes its share of each global batch, so N
  ranks follow the same optimisation as one process; one process writes checkpoints
  (kd_core.distributed.writes) and every rank resumes from its file.
- Checkpoints: after every epoch one safetensors file (weights, best weights, optimizer tensors;
  the rest as JSON in its header, nothing pickled) replaces the last one atomically; a killed run
  restarts from it and ends with the same weights as an uninterrupted one.
- Early stopping: held-out labelled rows are scored each epoch; training stops after `patience`
  epochs below the best validation accuracy and the model keeps the best epoch's weights.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import safe_open, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kd_core.distributed import lead_bytes, no_buffer_sync, pick_device, ranks, to_device, writes
from kd_core.errors import UserError

LossFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]  # -> per-row loss (B,)
# row numbers (B,) -> teacher logits (B, K), or a top-k batch (kd_core.cache.TopK: values, indices, tail)
SoftLabels = Callable[[np.ndarray], Any]
Extra = Callable[[np.ndarray], torch.Tensor]  # row numbers (B,) -> per-row loss (B,) from the forward just run
EpochHook = Callable[[dict[str, float]], None]
Progress = Callable[[int, int], None]  # (rows done, rows in all epochs)
History = list[dict[str, float]]

CHECKPOINT_META = "kd_checkpoint"  # safetensors header key of the JSON part of a checkpoint
VAL_BATCH = 4096  # validation rows per forward pass: no gradients, so bigger than a training batch


@dataclass(frozen=True)
class FitConfig:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    seed: int
    device: str = "auto"
    compile: bool = False
    patience: int | None = None  # epochs below the best validation accuracy before stopping; None: never
    keep_best: bool = True  # end with the best validation epoch's weights; False: the last epoch's (a search
    # scores every candidate once, at the end of the same budget)
    steps: int | None = None  # optimizer steps in all (the last epoch stops when they are done): equal budgets
    # over row sets of different sizes; None: `epochs` whole passes


def _targets_to(t: np.ndarray | Any, device: torch.device) -> torch.Tensor | Any:
    """Soft targets to the device: dense logits as one tensor; a top-k batch moves itself (`.to`)."""
    return to_device(t, device) if isinstance(t, np.ndarray) else t.to(device)


def _teacher_class(t: np.ndarray | torch.Tensor | Any) -> np.ndarray | torch.Tensor:
    """The teacher's class per row from dense logits (argmax over classes) or a top-k batch (its own)."""
    if isinstance(t, np.ndarray):
        return t.argmax(axis=-1)
    return t.argmax(dim=-1) if isinstance(t, torch.Tensor) else t.argmax()


# --- early stopping: pure functions of the history ------------------------------------------------

def best_epoch(history: History) -> int:
    """The epoch whose weights to keep: best validation accuracy, the latest of equals (it trained on
    a smaller learning rate); the last epoch when nothing was validated."""
    if not history:
        return 0
    if "val_accuracy" not in history[-1]:
        return int(history[-1]["epoch"])
    best = max(range(len(history)), key=lambda i: (history[i]["val_accuracy"], i))
    return int(history[best]["epoch"])


def bucketed(order: np.ndarray, lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
             span: int = 32) -> np.ndarray:
    """`order` regrouped so each batch holds rows of similar length: windows of `span` batches are
    sorted by length, cut into batches, and the full batches shuffled (the short last one stays last).
    Padded sequences then cost their own length, not the longest row's of a random batch.  # (N,) -> (N,)"""
    batches: list[np.ndarray] = []
    for start in range(0, len(order), batch_size * span):  # only the last window can end in a short batch
        window = order[start:start + batch_size * span]
        window = window[np.argsort(lengths[window], kind="stable")]
        batches += [window[i:i + batch_size] for i in range(0, len(window), batch_size)]
    full = [b for b in batches if len(b) == batch_size]
    rest = [b for b in batches if len(b) < batch_size]
    return np.concatenate([full[i] for i in rng.permutation(len(full))] + rest) if batches else order


def budget(cfg: FitConfig, rows: int) -> tuple[int, int]:
    """Optimizer steps and passes (the last maybe partial) that `cfg` trains over `rows` rows."""
    per_epoch = max(1, -(-rows // cfg.batch_size))
    steps = cfg.steps or per_epoch * cfg.epochs
    return steps, -(-steps // per_epoch)


def should_stop(history: History, patience: int | None) -> bool:
    """`patience` epochs have passed since the best one."""
    return patience is not None and bool(history) and history[-1]["epoch"] - best_epoch(history) >= patience


# --- checkpoints ----------------------------------------------------------------------------------

@dataclass
class TrainState:
    """Everything a resumed run needs to continue exactly where the killed one stopped."""

    net: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    rng: np.random.Generator
    history: History
    best: dict[str, torch.Tensor] | None = None  # weights of best_epoch(history), when validating


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()  # a copy: safetensors refuses shared storage


def save_checkpoint(path: Path, s: TrainState) -> None:
    """One safetensors file: weights, best weights and optimizer tensors; the scalars (optimizer
    hyper-parameters, scheduler, numpy RNG, history) as JSON in its header. Nothing is pickled, so
    loading runs no code. Written under a temporary name and renamed: a kill leaves the old file or
    the new one, never half of one."""
    opt_state = s.opt.state_dict()
    tensors = {f"model/{k}": _cpu(v) for k, v in s.net.state_dict().items()}
    tensors |= {f"best/{k}": _cpu(v) for k, v in (s.best or {}).items()}
    scalars: dict[str, object] = {}
    for i, per_param in opt_state["state"].items():
        for name, v in per_param.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim/{i}/{name}"] = _cpu(v)
            else:
                scalars[f"{i}/{name}"] = v
    tensors["rng/torch"] = torch.get_rng_state()
    if torch.cuda.is_initialized():  # dropout on a GPU draws from the device's generator
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    meta = {"history": s.history, "param_groups": opt_state["param_groups"], "optim_scalars": scalars,
            "scheduler": s.sched.state_dict(), "numpy_rng": s.rng.bit_generator.state}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={CHECKPOINT_META: json.dumps(meta)})
    os.replace(tmp, path)


def _read_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """(JSON part, tensors) of a checkpoint, or None when there is none or it cannot be read. The
    writing process reads the file and every rank parses its bytes: machines need not share a disk."""
    blob = lead_bytes(path)
    if blob is None:
        return None
    try:  # safetensors: an 8-byte little-endian header length, the JSON header, then the tensors
        header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
        return json.loads(header["__metadata__"][CHECKPOINT_META]), load_tensors(blob)
    except (ValueError, KeyError, TypeError, SafetensorError) as exc:
        warnings.warn(f"{path}: unreadable checkpoint ({exc}); training from the start", stacklevel=3)
        return None


def checkpoint_epochs(path: Path) -> int:
    """How many epochs the checkpoint at `path` holds: 0 when there is none or it cannot be read."""
    try:
        with safe_open(str(path), "pt") as f:
            return len(json.loads(f.metadata()[CHECKPOINT_META])["history"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return 0


def _part(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def restore_checkpoint(path: Path, s: TrainState) -> bool:
    """Load `path` into `s` (weights, optimizer, scheduler, RNGs, history); False if there is none."""
    read = _read_checkpoint(path)
    if read is None:
        return False
    meta, tensors = read
    s.net.load_state_dict(_part(tensors, "model/"))
    s.best = _part(tensors, "best/") or None
    state: dict[int, dict] = {}
    for key, v in [*_part(tensors, "optim/").items(), *meta["optim_scalars"].items()]:
        i, name = key.split("/", 1)
        state.setdefault(int(i), {})[name] = v
    s.opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    s.sched.load_state_dict(meta["scheduler"])
    s.rng.bit_generator.state = meta["numpy_rng"]
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    s.history = meta["history"]
    return True


# --- the loop -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Rows:
    """Rows and labels on the training device, indexed there per batch (on the host: labels, for tallies)."""

    x: torch.Tensor  # (N, F)
    y: torch.Tensor  # (N,)
    y_host: np.ndarray  # (N,)

    @classmethod
    def of(cls, x: np.ndarray, y: np.ndarray, device: torch.device) -> _Rows:
        """On CPU the tensors share the arrays' memory; on a GPU they are copied there once."""
        return cls(torch.from_numpy(np.ascontiguousarray(x)).to(device),
                   torch.from_numpy(np.ascontiguousarray(y)).to(device), y)


@dataclass(frozen=True)
class _Step:
    """How one process runs a step: its rank among `world`, where, and what to call forward."""

    model: nn.Module  # the network, DDP-wrapped and/or compiled
    device: torch.device
    amp: bool
    rank: int
    world: int


def _train_epoch(st: _Step, s: TrainState, r: _Rows, soft: SoftLabels | None, order: np.ndarray,
                 loss_fn: LossFn, batch_size: int, tick: Callable[[int], None] | None,
                 extra: Extra | None = None) -> dict[str, float]:
    """One pass over `order` (row numbers) in global batches; returns the epoch's metrics (all ranks)."""
    loss_sum = torch.zeros((), device=st.device)
    hits = torch.zeros(2, dtype=torch.int64, device=st.device)  # [label right, teacher's class]
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]  # (B,) the global batch
        mine = batch[st.rank::st.world]  # (b,) this rank's share
        idx = to_device(mine, st.device)  # (b,)
        xb, yb = r.x[idx], r.y[idx]  # (b, F), (b,)
        tb = _targets_to(soft(mine), st.device) if soft is not None else None  # (b, K), or top-k (b, K')
        with torch.autocast(st.device.type, dtype=torch.bfloat16, enabled=st.amp):
            out = st.model(xb)  # (b, K)
            per_row = loss_fn(out, tb, yb)  # (b,)
            if extra is not None:  # terms that need the model's insides (feature hints, weight penalty)
                per_row = per_row + extra(mine)  # (b,)
        if per_row.shape != (len(mine),):
            raise UserError(f"the loss must return one value per row, shape ({len(mine)},); "
                            f"it returned {tuple(per_row.shape)}")
        # Sum over my rows / global batch rows, × world because DDP averages gradients over ranks:
        # the update is the mean over the global batch, whatever each rank's share of it.
        loss = per_row.sum() * (st.world / len(batch))
        s.opt.zero_grad(set_to_none=True)
        loss.backward()
        s.opt.step()
        s.sched.step()
        with torch.no_grad():  # tallies stay on the device, read once per epoch: no sync per step
            pred = out.argmax(dim=-1).reshape(-1)  # (b·P,); never equals the -1 of an unlabelled row
            teacher = _teacher_class(tb).reshape(-1) if tb is not None else yb.reshape(-1)
            hits += torch.stack([pred == yb.reshape(-1), pred == teacher]).sum(dim=1)
            loss_sum += per_row.sum()
        if tick is not None:
            tick(start + len(batch))
    sums = torch.cat([loss_sum[None], hits.to(loss_sum.dtype)])  # (3,)
    if st.world > 1:
        dist.all_reduce(sums)
    total, correct, agree = sums.tolist()
    labelled = int((r.y_host[order] >= 0).sum())  # positions with a label (every token of an `lm` row)
    metrics = {"loss": total / len(order), "accuracy": correct / max(labelled, 1)}
    if soft is not None:
        metrics["agreement_with_teacher"] = agree / r.y_host[order].size
    return metrics


@torch.no_grad()
def _validate(st: _Step, net: nn.Module, r: _Rows, soft: SoftLabels | None, val: np.ndarray) -> dict[str, float]:
    """Accuracy (and agreement with the teacher) on the held-out rows, as rank 0 measured it."""
    net.eval()
    correct = agree = 0
    nll = 0.0
    step = max(1, VAL_BATCH // r.y_host[:1].size)  # rows of P positions: as many positions per pass
    for start in range(0, len(val), step):
        idx = val[start:start + step]  # (b,)
        with torch.autocast(st.device.type, dtype=torch.bfloat16, enabled=st.amp):
            logits = net(r.x[to_device(idx, st.device)]).float()  # (b, K) or (b, P, K)
        pred = logits.argmax(dim=-1).cpu().numpy()  # (b,) or (b, P)
        labels = r.y[to_device(idx, st.device)].reshape(-1).long()  # (b·P,)
        nll += float(nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels, reduction="sum"))
        correct += int((pred == r.y_host[idx]).sum())
        if soft is not None:
            agree += int((pred.reshape(-1) == np.asarray(_teacher_class(soft(idx))).reshape(-1)).sum())
    net.train()
    n = r.y_host[val].size  # positions validated
    scores = torch.tensor([correct / n, agree / n, nll / n], dtype=torch.float64)
    if st.world > 1:  # ranks hold equal weights; rank 0's word keeps their stopping decisions equal
        dist.broadcast(scores, src=0)
    # mean negative log-likelihood of the labels: perplexity for `lm`, a tie-breaker for classifiers
    out = {"val_accuracy": scores[0].item(), "val_nll": scores[2].item()}
    if soft is not None:
        out["val_agreement_with_teacher"] = scores[1].item()
    return out


def _prepare(net: nn.Module, cfg: FitConfig, device: torch.device, world: int) -> nn.Module:
    """The module the steps call: `net` wrapped in DDP in a process group, then compiled if asked."""
    model = net
    if world > 1:  # buffers (the standardisation) are constants: synced once at init, not every step
        model = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None,
                                        **no_buffer_sync())
    return cast(nn.Module, torch.compile(model)) if cfg.compile else model  # an OptimizedModule


def fit(model: nn.Module, x: np.ndarray, y: np.ndarray, loss_fn: LossFn, cfg: FitConfig,
        soft: SoftLabels | None = None, val: np.ndarray | None = None, on_epoch: EpochHook | None = None,
        progress: Progress | None = None, checkpoint: Path | None = None, extra: Extra | None = None,
        lengths: np.ndarray | None = None) -> History:
    """Train `model` in place on rows `x` (N, F) with labels `y` (N,), -1 marking unlabelled rows.
    A row may hold P positions (`lm`: a token sequence, labels (N, P)): the loss still returns one
    value per row, and accuracy and agreement count positions.

    `val` (row numbers of labelled rows) are held out: never trained on, scored every epoch for
    early stopping; the model ends with the best epoch's weights (unless `cfg.keep_best` is off).
    With `checkpoint`, training resumes from that file if it exists and one rank rewrites it after
    every epoch. Returns one dict of metrics per epoch (also passed to `on_epoch`): mean loss,
    accuracy on the labelled rows trained on, agreement with the teacher when soft labels are given,
    and the validation scores.
    `extra(rows)` adds a per-row term computed after each forward (kd_core.features.extra_loss).
    `lengths` (N,): rows are padded sequences of these lengths; batches then group similar lengths.
    """
    rank, world = ranks()
    device = pick_device(cfg.device)
    val = np.sort(val) if val is not None and len(val) else None
    rows = np.setdiff1d(np.arange(len(x)), val) if val is not None else np.arange(len(x))  # (N_train,)
    torch.manual_seed(cfg.seed)
    net = model.to(device).train()
    per_epoch = -(-len(rows) // cfg.batch_size)
    steps, epochs = budget(cfg, len(rows))
    # fused: one kernel for the whole update on CUDA, where a small student's step is launch-bound
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            fused=device.type == "cuda")
    s = TrainState(net, opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps),
                   np.random.default_rng(cfg.seed), [])
    if checkpoint is not None:
        restore_checkpoint(checkpoint, s)
    st = _Step(_prepare(net, cfg, device, world), device, device.type == "cuda", rank, world)
    r = _Rows.of(x, y, device)
    while len(s.history) < epochs and not should_stop(s.history, cfg.patience):
        epoch, t0 = len(s.history) + 1, time.perf_counter()
        order = rows[s.rng.permutation(len(rows))]  # (N_train,) the same on every rank
        if lengths is not None:
            order = bucketed(order, lengths, cfg.batch_size, s.rng)
        order = order[:(steps - (epoch - 1) * per_epoch) * cfg.batch_size]  # the budget's last epoch may be short
        tick = None if progress is None else (
            lambda done, e=epoch: progress((e - 1) * len(rows) + done, epochs * len(rows)))
        row = {"epoch": float(epoch), **_train_epoch(st, s, r, soft, order, loss_fn, cfg.batch_size, tick, extra)}
        if val is not None:
            row |= _validate(st, net, r, soft, val)
        row["seconds"] = time.perf_counter() - t0
        s.history.append(row)
        if val is not None and cfg.keep_best and best_epoch(s.history) == epoch:
            s.best = {k: v.detach().clone() for k, v in net.state_dict().items()}
        if checkpoint is not None and writes():
            save_checkpoint(checkpoint, s)
        if on_epoch is not None:
            on_epoch(row)
    if s.best is not None:
        net.load_state_dict(s.best)
    net.cpu().eval()
    return s.history
