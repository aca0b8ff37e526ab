"""Benchmark the soft-label cache against its baselines, measured in the same run.

    .venv/bin/python bench/cache.py                 # full: 1,000,000 x 1,000 rows (about 5 GB of disk)
    .venv/bin/python bench/cache.py --big 200000    # quicker
    .venv/bin/python bench/cache.py --device cuda --classes 32000 --top-k 64 --rows 131072   # an LM head on a GPU

With `--classes` (or a `--device` other than cpu) the teacher has an LM head's shape, 1024 -> 4096 ->
C (bf16 autocast on CUDA), its rows are generated on the device, and the run prints, against the bare
forward on the same device: top-k and dense float16 caching throughput, the bytes per row stored, and
the dense cache's MB/s against a plain sequential write of the same bytes (issue 15).

Teacher: an MLP 256 -> 1024 -> 1000 on synthetic rows (issue 3). Prints, each with its target:
  throughput   caching rows/s / bare torch.inference_mode() loop rows/s      (>= 0.90)
  size         dense float16 bytes / (N*C*2)                                 (<= 1.01)
               top-k bytes / (N*K*(2+4) + tail)                              (<= 1.00)
  memory       peak RSS at N=big and its ratio to N=big/10                   (<= 2 GB, <= 1.10)
  reading      teacher forward of 256 random rows / memory-mapped read       (>= 10)

How small a cache can get and what it loses (top_p, sampling, the compact encoding: bytes per token and
KL on a real teacher's held-out text) is `bench/cache_size.py`; the students those caches train,
against full-vocabulary targets, `bench/sparse_kd.py`.
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

from kd_core.cache import CacheSettings, LogitCache, build_cache, cache_key, concat, encode_batch

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


def lm_teacher(classes: int, device: torch.device, hidden: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1024, hidden), nn.ReLU(), nn.Linear(hidden, classes)).eval().to(device)


def device_rows(start: int, stop: int, device: torch.device) -> torch.Tensor:
    """Rows generated on the device, a pure function of their range: the host never feeds the teacher."""
    return torch.randn(stop - start, 1024, device=device, generator=torch.Generator(device).manual_seed(start))


def lm_compute(model: nn.Module, device: torch.device, settings: CacheSettings | None, classes: int, batch: int):
    """What TeacherLogits does per shard: forward each batch under bf16 autocast (CUDA) and encode it
    there; on the CPU hand the shard's logits to the writer thread."""
    amp = torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda")

    @torch.inference_mode()
    def compute(start: int, stop: int):
        with amp:
            outs = [model(device_rows(i, min(i + batch, stop), device)) for i in range(start, stop, batch)]
            if settings is None:  # the bare forward: nothing leaves the device
                return outs
            if device.type == "cpu":  # as TeacherLogits: the build's writer thread encodes CPU logits
                return torch.cat(outs)
            return concat([encode_batch(o, [], settings, classes, consume=True) for o in outs])
    return compute


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_write(path: Path, n_bytes: int, chunk: int) -> float:
    """Seconds to write `n_bytes` sequentially in files of `chunk` bytes: the disk's own speed here."""
    buf = np.random.default_rng(0).integers(0, 255, chunk, dtype=np.uint8)
    t0 = time.perf_counter()
    for i in range(0, n_bytes, chunk):
        (path / f"plain-{i}.bin").write_bytes(memoryview(buf)[:min(chunk, n_bytes - i)])
    return time.perf_counter() - t0


def lm_head(args: argparse.Namespace) -> None:
    device, classes = torch.device(args.device), args.classes or 32000
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    model, shard = lm_teacher(classes, device, args.hidden), args.shard_rows
    print(f"teacher MLP 1024->{args.hidden}->{classes} on {device} ({name}), {args.rows:,} rows, batch {args.batch}")
    tmp = Path(args.tmp or tempfile.mkdtemp(prefix="kd-bench-"))
    for top_k in (None, args.top_k):  # warm-up: every kernel's first use, pinned buffers of both sizes
        settings = CacheSettings("float16", shard, top_k)
        d = Path(tempfile.mkdtemp(dir=tmp))
        build_cache(lm_compute(model, device, settings, classes, args.batch), min(shard, args.rows), classes,
                    d / "cache", d / "work", cache_key("warm", "up", settings), settings, {})
        shutil.rmtree(d)
    lm_compute(model, device, None, classes, args.batch)(0, args.batch)
    sync(device)
    t0 = time.perf_counter()
    bare = lm_compute(model, device, None, classes, args.batch)
    for s in range(0, args.rows, shard):
        bare(s, min(s + shard, args.rows))
    sync(device)
    bare_s = time.perf_counter() - t0
    print(f"bare forward    {args.rows / bare_s:,.0f} rows/s")
    for top_k in (args.top_k, None):
        settings = CacheSettings("float16", shard, top_k)
        d = Path(tempfile.mkdtemp(dir=tmp))
        t0 = time.perf_counter()
        report = build_cache(lm_compute(model, device, settings, classes, args.batch), args.rows, classes,
                             d / "cache", d / "work", cache_key("bench", str(args.rows), settings), settings, {},
                             autocast="bfloat16" if device.type == "cuda" else None, device=device.type)
        took = time.perf_counter() - t0
        stored = disk_bytes(d / "cache")
        label = f"top-{top_k}" if top_k else "dense"
        print(f"{label:<15} {args.rows / took:,.0f} rows/s: ratio {bare_s / took:.3f} to the bare forward"
              f"{' (target >= 0.80)' if top_k else ''}; {report.bytes_per_row} bytes/row "
              f"({stored / args.rows:.1f} on disk with .npy headers)")
        if not top_k:
            plain = plain_write(Path(tempfile.mkdtemp(dir=tmp)), stored, shard * report.bytes_per_row)
            print(f"dense disk      {stored / took / 1e6:,.0f} MB/s written, plain sequential write of the same "
                  f"bytes {stored / plain / 1e6:,.0f} MB/s: ratio {plain / took:.3f}")
        shutil.rmtree(d)
    shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000, help="rows for the throughput comparison")
    ap.add_argument("--big", type=int, default=1_000_000, help="rows for the size and memory checks")
    ap.add_argument("--top-k", type=int, default=32)
    ap.add_argument("--child-top-k", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", default=None, help="scratch directory (needs ~N*C*2 bytes free)")
    ap.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, mps: with --classes, the LM-head comparison")
    ap.add_argument("--classes", type=int, default=0, help="LM-head teacher with this many classes")
    ap.add_argument("--hidden", type=int, default=4096, help="LM-head teacher's hidden width")
    ap.add_argument("--batch", type=int, default=2048, help="LM-head teacher's batch rows")
    ap.add_argument("--shard-rows", type=int, default=16384)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.classes or args.device != "cpu":
        return lm_head(args)
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
