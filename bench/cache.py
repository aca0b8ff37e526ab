"""Benchmark the soft-label cache against its baselines, measured in the same run.

    .venv/bin/python bench/cache.py                 # full: 1,000,000 x 1,000 rows (about 5 GB of disk)
    .venv/bin/python bench/cache.py --big 200000    # quicker

Teacher: an MLP 256 -> 1024 -> 1000 on synthetic rows (issue 3). Prints, each with its target:
  throughput   caching rows/s / bare torch.inference_mode() loop rows/s      (>= 0.90)
  size         dense float16 bytes / (N*C*2)                                 (<= 1.01)
               top-k bytes / (N*K*(2+4) + tail)                              (<= 1.00)
  memory       peak RSS at N=big and its ratio to N=big/10                   (<= 2 GB, <= 1.10)
  reading      teacher forward of 256 random rows / memory-mapped read       (>= 10)
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kd_core.cache import CacheSettings, LogitCache, build_cache, cache_key

FEATURES, HIDDEN, CLASSES = 256, 1024, 1000


def teacher() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, CLASSES)).eval()


def rows(start: int, stop: int) -> torch.Tensor:
    """Synthetic rows, a pure function of their range, so no run holds all N rows in memory."""
    return torch.randn(stop - start, FEATURES, generator=torch.Generator().manual_seed(start))


def make_compute(model: nn.Module, batch: int = 2048):
    @torch.inference_mode()
    def compute(start: int, stop: int) -> torch.Tensor:
        return torch.cat([model(rows(i, min(i + batch, stop))) for i in range(start, stop, batch)])
    return compute


def build(n: int, out: Path, dtype: str = "float16", top_k: int | None = None, shard_rows: int = 16384) -> float:
    settings = CacheSettings(dtype, shard_rows, top_k)
    t0 = time.perf_counter()
    build_cache(make_compute(teacher()), n, CLASSES, out / "cache", out / "work",
                cache_key("bench", str(n), settings), settings, {})
    return time.perf_counter() - t0


def bare_loop(n: int, shard_rows: int = 16384) -> float:
    compute = make_compute(teacher())
    t0 = time.perf_counter()
    for s in range(0, n, shard_rows):
        compute(s, min(s + shard_rows, n))
    return time.perf_counter() - t0


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.name != "manifest.json")


def child(args: argparse.Namespace) -> None:
    """One cache build in this process; prints its peak RSS (the parent compares processes)."""
    with tempfile.TemporaryDirectory(dir=args.tmp) as d:
        build(args.child, Path(d), top_k=args.child_top_k)
        print(json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                          "bytes": disk_bytes(Path(d) / "cache")}))


def run_child(n: int, tmp: str, top_k: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", str(n), "--tmp", tmp] + (["--child-top-k", str(top_k)] if top_k else [])
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000, help="rows for the throughput comparison")
    ap.add_argument("--big", type=int, default=1_000_000, help="rows for the size and memory checks")
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--child-top-k", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default=None, help="scratch directory (needs ~N*C*2 bytes free)")
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    tmp = args.tmp or tempfile.mkdtemp(prefix="kd-bench-")
    print(f"teacher MLP {FEATURES}->{HIDDEN}->{CLASSES}, torch threads {torch.get_num_threads()}")

    bare = bare_loop(args.rows)
    d = Path(tempfile.mkdtemp(dir=tmp))
    cached = build(args.rows, d)
    shutil.rmtree(d)
    print(f"throughput  bare loop {args.rows / bare:,.0f} rows/s, caching {args.rows / cached:,.0f} rows/s: "
          f"ratio {bare / cached:.3f} (target >= 0.90)")

    small, big = run_child(args.big // 10, tmp), run_child(args.big, tmp)
    print(f"size        dense float16 at N={args.big:,}: {big['bytes']:,} B = "
          f"{big['bytes'] / (args.big * CLASSES * 2):.4f} x N*C*2 (target <= 1.01)")
    print(f"memory      peak RSS {small['rss_mb']:.0f} MB at N={args.big // 10:,}, {big['rss_mb']:.0f} MB at "
          f"N={args.big:,}: ratio {big['rss_mb'] / small['rss_mb']:.3f} (targets <= 2048 MB, <= 1.10)")
    topk = run_child(args.big, tmp, args.top_k)
    bound = args.big * args.top_k * (2 + 4) + args.big * 4
    print(f"size        top-{args.top_k} float16 at N={args.big:,}: {topk['bytes']:,} B = "
          f"{topk['bytes'] / bound:.4f} x (N*K*(2+4) + N*4 tail); the excess is .npy headers, 128 B a file")

    d = Path(tempfile.mkdtemp(dir=tmp))
    build(args.rows, d)
    cache, model, rng = LogitCache(d / "cache"), teacher(), np.random.default_rng(0)
    idx = [np.sort(rng.choice(args.rows, 256, replace=False)) for _ in range(200)]
    cache.take(idx[0])  # verify checksums once, as training does
    t0 = time.perf_counter()
    for i in idx:
        cache.take(i)
    read = (time.perf_counter() - t0) / len(idx)
    x = rows(0, 256)  # the rows themselves are free for the teacher here: only its forward is timed
    with torch.inference_mode():
        t0 = time.perf_counter()
        for _ in idx:
            model(x)
        fwd = (time.perf_counter() - t0) / len(idx)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"reading     256 random rows: mmap {read * 1e3:.3f} ms, teacher {fwd * 1e3:.3f} ms: "
          f"{fwd / read:.1f}x faster (target >= 10)")


if __name__ == "__main__":
    main()
