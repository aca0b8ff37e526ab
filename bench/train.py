"""Benchmark student training against its baselines, measured in the same run.

    .venv/bin/python bench/train.py                  # 54,000 rows, the demo's shapes
    .venv/bin/python bench/train.py --rows 20000     # quicker
    python bench/train.py --device cuda              # on a GPU, as kd_core.train runs there

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

`--device` (default cpu, so figures stay comparable across machines) moves all three to that device.
On CUDA the bare loop holds rows, labels and logits on the GPU and runs the forward pass and loss
under the same bf16 autocast as kd_core.train; fit still reads each batch's logits from the cache
on the host (pinned, non-blocking copies); online KD runs the teacher on the GPU under bf16 autocast,
each batch's rows going there and its logits returning through the host as SoftLabels asks.
Timings synchronise the GPU before they start and stop.
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
from kd_core.cache import CacheSettings, LogitCache, build_cache, cache_key
from kd_core.data import Schema
from kd_core.distributed import pick_device
from kd_core.evaluate import count_macs
from kd_core.stages._common import validation_rows
from kd_core.train import FitConfig, fit

FEATURES, CLASSES, LABELLED = 40, 10, 4000
T, ALPHA = 2.0, 0.9
CFG = dict(batch_size=256, lr=0.002, weight_decay=1e-4, seed=0)


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


def amp(device: torch.device) -> torch.autocast:
    """kd_core.train's autocast: bf16 on CUDA, off elsewhere."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def make_cache(teacher: nn.Module, x: np.ndarray, root: Path, device: torch.device) -> LogitCache:
    """The teacher's float32 logits (as the cache stage writes them; on `device`, untimed)."""
    settings = CacheSettings("float32", 16384)
    key = cache_key("bench-teacher", "bench-data", settings)

    @torch.inference_mode()
    def compute(start: int, stop: int) -> torch.Tensor:
        return teacher(torch.from_numpy(x[start:stop]).to(device)).cpu()

    build_cache(compute, len(x), CLASSES, root / "logits", root / "work", key, settings, {})
    return LogitCache(root / "logits", key)


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work, so a timing ends when the work does (nothing to wait for on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, epochs: int, device: torch.device) -> tuple[float, float]:
    """(wall, CPU) seconds per epoch of `fn()`, which trains `epochs` epochs. CPU time is this
    process's own (all threads), which a busy neighbour on a shared machine does not inflate."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return (time.perf_counter() - wall) / epochs, (time.process_time() - cpu) / epochs


def bare_loop(x: np.ndarray, y: np.ndarray, logits: np.ndarray, epochs: int, device: torch.device,
              compile_: bool = False) -> None:
    """The baseline: the same rows, model, optimiser, schedule and loss over tensors in memory, nothing else.

    On a GPU the tensors sit there and each step runs under kd_core.train's bf16 autocast; `compile_`
    wraps the model in torch.compile as FitConfig.compile does."""
    rows = torch.from_numpy(np.setdiff1d(np.arange(len(x)), validation_rows(LABELLED, 0.1, 0)))  # (N_train,)
    xt, yt, tt = (torch.from_numpy(a).to(device) for a in (x, y, logits))  # (N, F), (N,), (N, K)
    model = models.build(STUDENT, x, 0).to(device)
    forward = torch.compile(model) if compile_ else model
    opt = torch.optim.AdamW(model.parameters(), lr=CFG["lr"], weight_decay=CFG["weight_decay"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * -(-len(rows) // CFG["batch_size"]))
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = rows[torch.randperm(len(rows), generator=g)].to(device)  # (N_train,) one copy per epoch
        for start in range(0, len(perm), CFG["batch_size"]):
            idx = perm[start:start + CFG["batch_size"]]  # (B,)
            with amp(device):
                loss = losses.hinton_kd(forward(xt[idx]), tt[idx], yt[idx], T, ALPHA).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()


def fit_loop(x: np.ndarray, y: np.ndarray, soft, epochs: int, checkpoint: Path | None, device: str,
             compile_: bool) -> None:
    """kd_core.train.fit as the student stage runs it: validation rows held out, a checkpoint per epoch."""
    fit(models.build(STUDENT, x, 0), x, y, lambda s, t, yb: losses.hinton_kd(s, t, yb, T, ALPHA),
        FitConfig(epochs=epochs, device=device, compile=compile_, **CFG), soft=soft,
        val=validation_rows(LABELLED, 0.1, 0), checkpoint=checkpoint)
    if checkpoint is not None:
        checkpoint.unlink()  # the next round starts afresh instead of resuming


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=54_000, help="labelled + transfer rows (the demo: 54,000)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per method per round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu",
                    help="where all three train (default cpu: figures comparable across machines; auto: as fit picks)")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the student in fit (FitConfig.compile) and in the bare loop")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    x, y = dataset(args.rows)
    teacher = models.build(TEACHER, x, 0).eval()
    one = torch.zeros(1, FEATURES)
    macs_t, macs_s = count_macs(teacher, one), count_macs(models.build(STUDENT, x, 0), one)
    teacher = teacher.to(device)

    @torch.inference_mode()
    def online(idx: np.ndarray) -> np.ndarray:  # the teacher in the loop  # (B,) -> (B, K)
        with amp(device):
            out = teacher(torch.from_numpy(x[idx]).to(device))  # (B, K)
        return out.float().cpu().numpy()

    with tempfile.TemporaryDirectory() as tmp:
        cache, ckpt = make_cache(teacher, x, Path(tmp), device), Path(tmp) / "checkpoint.safetensors"
        logits = cache.take(np.arange(len(x)))  # (N, K), for the bare loop
        e_online = max(1, args.epochs // 3)
        runs = {"bare": (lambda: bare_loop(x, y, logits, args.epochs, device, args.compile), args.epochs),
                "cached": (lambda: fit_loop(x, y, cache.take, args.epochs, ckpt, args.device, args.compile),
                           args.epochs),
                "online": (lambda: fit_loop(x, y, online, e_online, None, args.device, args.compile), e_online)}
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in runs}
        for _ in range(args.rounds):
            for name, (fn, epochs) in runs.items():
                times[name].append(timed(fn, epochs, device))
    wall = {k: min(w for w, _ in v) for k, v in times.items()}
    cpu = {k: min(c for _, c in v) for k, v in times.items()}
    report = {"rows": args.rows, "device": str(device), "compile": args.compile,
              "threads": torch.get_num_threads(), "teacher_macs": macs_t,
              "student_macs": macs_s, "mac_ratio": round(macs_t / macs_s, 1),
              "epoch_seconds_wall": {k: round(v, 4) for k, v in wall.items()},
              "epoch_seconds_cpu": {k: round(v, 4) for k, v in cpu.items()},
              "cache_vs_bare": {"wall": round(wall["cached"] / wall["bare"], 3),
                                "cpu": round(cpu["cached"] / cpu["bare"], 3)},
              "online_vs_cached": {"wall": round(wall["online"] / wall["cached"], 2),
                                   "cpu": round(cpu["online"] / cpu["cached"], 2)}}
    print(f"epoch     wall: bare loop {wall['bare']:.3f} s, fit from the cache {wall['cached']:.3f} s, online KD "
          f"{wall['online']:.3f} s ({args.rows:,} rows, {device}{', compiled' if args.compile else ''}, "
          f"{torch.get_num_threads()} threads; CPU s in the JSON)")
    print(f"cache     fit from the cache / bare loop = {report['cache_vs_bare']['wall']:.3f} wall, "
          f"{report['cache_vs_bare']['cpu']:.3f} CPU  (target <= 1.15)")
    print(f"online    online KD / cached KD = {report['online_vs_cached']['wall']:.2f}x wall, "
          f"{report['online_vs_cached']['cpu']:.2f}x CPU; teacher {macs_t:,} MACs = {report['mac_ratio']}x "
          f"the student's {macs_s:,}  (target >= 2)")
    print(json.dumps(report))

if __name__ == "__main__":
    main()
