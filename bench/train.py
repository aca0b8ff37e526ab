"""Benchmark student training against its baselines, measured in the same run.

    .venv/bin/python bench/train.py                  # 54,000 rows, the demo's shapes
    .venv/bin/python bench/train.py --rows 20000     # quicker

Rows are MNIST-1D-shaped (40 features, 10 classes, random values: speed does not depend on them);
teacher and student are the demo's (cnn1d with 128 channels, mlp 256-128). Prints, with targets:
  cache     one epoch of kd_core.train.fit reading the memory-mapped logit cache (validation and the
            per-epoch checkpoint included) / a bare PyTorch loop over the same rows and logits held
            in memory as tensors                                                  (<= 1.15)
  online    one epoch of online KD (the same loop, the teacher run on every batch) / cached KD,
            with a teacher of >= 10x the student's MACs                          (>= 2)
Each method trains `--epochs` epochs per round (online KD a third of them), rounds interleaved so a
busy machine slows all alike; the figure per method is its fastest round, per epoch, in wall-clock
and in this process's CPU seconds (which a busy neighbour on a shared machine does not inflate).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kd_core import losses, models
from kd_core.data import Schema
from kd_core.evaluate import count_macs
from kd_core.logits import CacheSettings, LogitCache, build_cache, cache_key
from kd_core.stages._common import validation_rows
from kd_core.train import FitConfig, fit

FEATURES, CLASSES, LABELLED = 40, 10, 4000
T, ALPHA = 2.0, 0.9
CFG = dict(batch_size=256, lr=0.002, weight_decay=1e-4, seed=0, device="cpu")


def spec(arch: str, options: dict) -> models.ModelSpec:
    schema = Schema(tuple(f"x{i}" for i in range(FEATURES)), "label", tuple(range(CLASSES)))
    return models.ModelSpec(arch, options, schema)


STUDENT, TEACHER = spec("mlp", {"hidden": [256, 128]}), spec("cnn1d", {"channels": 128})


def dataset(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows (N, F) and labels (N,): the first LABELLED rows labelled, the rest transfer rows (-1)."""
    g = np.random.default_rng(0)
    x = g.normal(size=(n, FEATURES)).astype(np.float32)
    y = np.full(n, losses.UNLABELLED, dtype=np.int64)
    y[:LABELLED] = g.integers(0, CLASSES, LABELLED)
    return x, y


def make_cache(teacher: nn.Module, x: np.ndarray, root: Path) -> LogitCache:
    settings = CacheSettings("float32", 16384)
    key = cache_key("bench-teacher", "bench-data", settings)

    @torch.inference_mode()
    def compute(start: int, stop: int) -> torch.Tensor:
        return teacher(torch.from_numpy(x[start:stop]))

    build_cache(compute, len(x), CLASSES, root / "logits", root / "work", key, settings, {})
    return LogitCache(root / "logits", key)


def timed(fn, epochs: int) -> tuple[float, float]:
    """(wall, CPU) seconds per epoch of `fn()`, which trains `epochs` epochs. CPU time is this
    process's own (all threads), which a busy neighbour on a shared machine does not inflate."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - wall) / epochs, (time.process_time() - cpu) / epochs


def bare_loop(x: np.ndarray, y: np.ndarray, logits: np.ndarray, epochs: int) -> None:
    """The baseline: the same rows, model, optimiser, schedule and loss over tensors in memory, nothing else."""
    rows = torch.from_numpy(np.setdiff1d(np.arange(len(x)), validation_rows(LABELLED, 0.1, 0)))  # (N_train,)
    xt, yt, tt = torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(logits)
    model = models.build(STUDENT, x, 0)
    opt = torch.optim.AdamW(model.parameters(), lr=CFG["lr"], weight_decay=CFG["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * -(-len(rows) // CFG["batch_size"]))
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = rows[torch.randperm(len(rows), generator=g)]
        for start in range(0, len(perm), CFG["batch_size"]):
            idx = perm[start:start + CFG["batch_size"]]
            loss = losses.hinton_kd(model(xt[idx]), tt[idx], yt[idx], T, ALPHA).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def fit_loop(x: np.ndarray, y: np.ndarray, soft, epochs: int, checkpoint: Path | None) -> None:
    """kd_core.train.fit as the student stage runs it: validation rows held out, a checkpoint per epoch."""
    fit(models.build(STUDENT, x, 0), x, y, lambda s, t, yb: losses.hinton_kd(s, t, yb, T, ALPHA),
        FitConfig(epochs=epochs, **CFG), soft=soft, val=validation_rows(LABELLED, 0.1, 0), checkpoint=checkpoint)
    if checkpoint is not None:
        checkpoint.unlink()  # the next round starts afresh instead of resuming


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=54_000, help="labelled + transfer rows (the demo: 54,000)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per method per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    x, y = dataset(args.rows)
    teacher = models.build(TEACHER, x, 0).eval()
    macs_t, macs_s = count_macs(teacher, FEATURES), count_macs(models.build(STUDENT, x, 0), FEATURES)

    @torch.inference_mode()
    def online(idx: np.ndarray) -> np.ndarray:  # the teacher in the loop  # (B,) -> (B, K)
        return teacher(torch.from_numpy(x[idx])).numpy()

    with tempfile.TemporaryDirectory() as tmp:
        cache, ckpt = make_cache(teacher, x, Path(tmp)), Path(tmp) / "checkpoint.safetensors"
        logits = cache.take(np.arange(len(x)))  # (N, K), for the bare loop
        e_online = max(1, args.epochs // 3)
        runs = {"bare": (lambda: bare_loop(x, y, logits, args.epochs), args.epochs),
                "cached": (lambda: fit_loop(x, y, cache.take, args.epochs, ckpt), args.epochs),
                "online": (lambda: fit_loop(x, y, online, e_online, None), e_online)}
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
        for _ in range(args.rounds):
            for name, (fn, epochs) in runs.items():
                times[name].append(timed(fn, epochs))
    wall = {k: min(w for w, _ in v) for k, v in times.items()}
    cpu = {k: min(c for _, c in v) for k, v in times.items()}
    report = {"rows": args.rows, "threads": torch.get_num_threads(), "teacher_macs": macs_t,
              "student_macs": macs_s, "mac_ratio": round(macs_t / macs_s, 1),
              "epoch_seconds_wall": {k: round(v, 4) for k, v in wall.items()},
              "epoch_seconds_cpu": {k: round(v, 4) for k, v in cpu.items()},
              "cache_vs_bare": {"wall": round(wall["cached"] / wall["bare"], 3),
                                "cpu": round(cpu["cached"] / cpu["bare"], 3)},
              "online_vs_cached": {"wall": round(wall["online"] / wall["cached"], 2),
                                   "cpu": round(cpu["online"] / cpu["cached"], 2)}}
    print(f"epoch     wall: bare loop {wall['bare']:.3f} s, fit from the cache {wall['cached']:.3f} s, online KD "
          f"{wall['online']:.3f} s ({args.rows:,} rows, {torch.get_num_threads()} threads; CPU s in the JSON)")
    print(f"cache     fit from the cache / bare loop = {report['cache_vs_bare']['wall']:.3f} wall, "
          f"{report['cache_vs_bare']['cpu']:.3f} CPU  (target <= 1.15)")
    print(f"online    online KD / cached KD = {report['online_vs_cached']['wall']:.2f}x wall, "
          f"{report['online_vs_cached']['cpu']:.2f}x CPU; teacher {macs_t:,} MACs = {report['mac_ratio']}x "
          f"the student's {macs_s:,}  (target >= 2)")
    print(json.dumps(report))

if __name__ == "__main__":
    main()
