"""How small can the soft-label cache get, and what does it lose? Bytes per token and KL to the
teacher, for the lm example's teacher on held-out text (issue 26).

    .venv/bin/python bench/cache_size.py PROJECT [--tokens 4096]

PROJECT ran `prepare` and `teacher` with `task: lm` (e.g. the lm example after `make lm`). The
teacher runs once over the held-out sequences; each cache setting encodes the same logits through
the cache's own code (encode_batch, the compact frame and back) and is scored per token against
the full distribution p:
  bytes/token  what the setting stores (compact: the zstd frames of 4,096-token shards)
  KL/token     KL(p ‖ q), q the row as the reader reconstructs it (kept classes, the tail spread
               equally over its classes); a sampled row stores no mass on classes never drawn (∞)
  bias         ½ Σ |p̄ - q̄|, the distributions averaged over all tokens: mass a cache puts on the
               wrong classes on average (truncation spreads the tail over classes the teacher did
               not favour; sampling is unbiased: its noise shrinks as tokens average out)
  head KL      KL on the stored classes and one tail bucket (what the top-k loss sees): the
               encoding's own rounding error (a sampled row's buckets are a draw, not rounding: –)
  encode       seconds to encode (and pack) per second of teacher forward on this machine
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from _project import ran

from kd_core.cache import CacheSettings, decode
from kd_core.cache.compact import pack, unpack
from kd_core.cache.encode import encode_batch, to_host
from kd_core.cache.format import index_dtype

SHARD = 4096
SETTINGS = {  # name -> settings (encoding raw; "+ compact" variants are added below)
    "dense float16": CacheSettings("float16", SHARD),
    "top-64": CacheSettings("float16", SHARD, 64),
    "top-p 0.9 (K 64)": CacheSettings("float16", SHARD, 64, top_p=0.9),
    "top-8 + 16 sampled": CacheSettings("float16", SHARD, 24, sampling=16),
    "top-p 0.5 (≤ 4) + 12 sampled": CacheSettings("float16", SHARD, 16, top_p=0.5, sampling=12),
}
COMPACT = ("top-64", "top-p 0.9 (K 64)", "top-8 + 16 sampled", "top-p 0.5 (≤ 4) + 12 sampled")


def teacher_logits(root: Path, tokens: int) -> tuple[list[torch.Tensor], float, int]:
    """The teacher's (b·P, C) logits per batch of held-out sequences, forward seconds, classes."""
    params, task, splits = ran(root)
    x = task.inputs(splits.test, splits.schema)
    x = x[:max(1, tokens // task.positions(x))]
    teacher = task.load(root / params.paths.teacher)[0].eval()
    out, t0 = [], time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(x), 4):
            out.append(task.cache_logits(teacher, task.cache_batch(teacher, x[i:i + 4])).float())
    return out, time.perf_counter() - t0, len(splits.schema.classes)


def encoded(batches: list[torch.Tensor], s: CacheSettings, classes: int) -> tuple[dict[str, np.ndarray], int, float]:
    """Every token's arrays as the reader gets them, stored bytes, encode (+ pack) seconds."""
    t0, parts = time.perf_counter(), []
    for z in batches:
        parts.append(to_host(encode_batch(z.clone(), [], replace(s, encoding="raw"), classes)).arrays(
            replace(s, encoding="raw"), classes, (0, len(z))))
    arrays = {r: np.concatenate([p[r] for p in parts]) for r in parts[0]}
    if s.encoding != "compact":
        return arrays, sum(a.nbytes for a in arrays.values()), time.perf_counter() - t0
    manifest = {"dtype": s.dtype, "top_k": s.top_k, "index_dtype": index_dtype(classes).name}
    shards, size = [], 0
    for a in range(0, len(arrays["values"]), SHARD):
        frame = pack({r: v[a:a + SHARD] for r, v in arrays.items()}, s)["packed"]
        size += frame.nbytes
        shards.append(unpack(frame, manifest))
    seconds = time.perf_counter() - t0
    return {r: np.concatenate([p[r] for p in shards]) for r in shards[0]}, size, seconds


def reconstructed(arrays: dict[str, np.ndarray], s: CacheSettings, classes: int) -> torch.Tensor:
    """Log-probabilities the reader's dense view gives every class (LogitCache.take).  # (N, C)"""
    if not s.top_k:
        return torch.from_numpy(decode(arrays["logits"], s.dtype)).log_softmax(-1)
    v = torch.from_numpy(decode(arrays["values"], s.dtype))
    idx = torch.from_numpy(arrays["indices"].astype(np.int64))
    kept = torch.isfinite(v)
    n_tail = (classes - kept.sum(-1)).clamp_min(1)
    out = (torch.from_numpy(arrays["tail_lse"]) - n_tail.log())[:, None].expand(len(v), classes).clone()
    rows = torch.nonzero(kept, as_tuple=True)[0]
    out[rows, idx[kept]] = v[kept]
    return out.log_softmax(-1)


def scores(p_log: torch.Tensor, q_log: torch.Tensor, arrays: dict[str, np.ndarray], s: CacheSettings) -> dict:
    p = p_log.exp()
    kl = torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p)).sum(-1)
    bias = float((p.mean(0) - q_log.exp().mean(0)).abs().sum() / 2)
    head = 0.0
    if s.top_k and not s.sampling:  # buckets: stored classes + one tail bucket, teacher vs stored
        idx = torch.from_numpy(arrays["indices"].astype(np.int64))
        kept = torch.isfinite(torch.from_numpy(decode(arrays["values"], s.dtype)))
        pt = torch.where(kept, p.gather(-1, idx), torch.zeros(()))
        qt = torch.where(kept, q_log.exp().gather(-1, idx), torch.zeros(()))
        pt = torch.cat([pt, (1 - pt.sum(-1, keepdim=True)).clamp_min(0)], -1)
        qt = torch.cat([qt, (1 - qt.sum(-1, keepdim=True)).clamp_min(0)], -1)
        head = float(torch.where(pt > 0, pt * (pt.log() - qt.clamp_min(1e-30).log()), torch.zeros(())).sum(-1).mean())
    return {"kl": float(kl.mean()), "bias": bias, "head": head}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("project", type=Path)
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    torch.manual_seed(0)
    batches, forward_s, classes = teacher_logits(args.project.resolve(), args.tokens)
    p_log = torch.cat(batches).log_softmax(-1)
    n = len(p_log)
    print(f"{n} held-out tokens, {classes} classes; teacher forward {forward_s:.1f} s "
          f"({n / forward_s:.0f} tokens/s, 2-core CPU)\n")
    print("| cache | bytes/token | KL/token (nats) | bias (nats) | head KL (nats) | encode / forward |")
    print("|---|---|---|---|---|---|")
    variants = dict(SETTINGS) | {f"{k} + compact": replace(SETTINGS[k], encoding="compact") for k in COMPACT}
    for name, s in variants.items():
        arrays, size, seconds = encoded(batches, s, classes)
        r = scores(p_log, reconstructed(arrays, s, classes), arrays, s)
        kl, head = ("∞ (a sample)", "–") if s.sampling else (f"{r['kl']:.4f}", f"{r['head']:.5f}")
        print(f"| {name} | {size / n:.1f} | {kl} | {r['bias']:.4f} | {head} | {seconds / forward_s:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
