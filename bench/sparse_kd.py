"""Students from sparse caches against full-vocabulary KD, at equal steps (issue 26).

    .venv/bin/python bench/sparse_kd.py PROJECT [--steps 30] [--shard 2048]

PROJECT ran `prepare` and `teacher` with `task: lm` (the lm example after `make lm`). The teacher
runs once over the first `steps × train.batch_size` training sequences; its logits (float16, in
memory) are the full-vocabulary targets, and every cache setting is built from exactly those
logits by the cache's own code (`build_cache`: encode, compact frames, checksums) into a temporary
store and read back by `LogitCache`. Each student then trains `steps` steps from the same
initialisation on the same sequences in the same order (the project's student, loss mix alpha and
T, learning rate): the full-vocabulary one on forward KL against every class (what online KD with
the teacher in the loop computes), the others on the top-k-aware loss against their cache.
Prints held-out perplexity against bytes per token, and the gap to the full-vocabulary student.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from _project import ran

from kd_core import losses
from kd_core.cache import CacheSettings, LogitCache, build_cache, cache_key
from kd_core.stages._common import fit_config, per_row, position_targets
from kd_core.tasks.lm import scoring as lm_eval
from kd_core.train import fit

VARIANTS = {  # name -> cache settings (shard_rows set from --shard)
    "top-64 (today)": CacheSettings("float16", 0, 64),
    "top-64 + compact": CacheSettings("float16", 0, 64, encoding="compact"),
    "top-p 0.9 (K 64) + compact": CacheSettings("float16", 0, 64, top_p=0.9, encoding="compact"),
    "top-8 + 16 sampled + compact": CacheSettings("float16", 0, 24, sampling=16, encoding="compact"),
    "top-p 0.5 (≤ 4) + 12 sampled + compact": CacheSettings("float16", 0, 16, top_p=0.5, sampling=12,
                                                            encoding="compact"),
}


def teacher_targets(root: Path, sequences: int) -> tuple[np.ndarray, np.ndarray, torch.Tensor, float]:
    """Training rows x, y (N, L) and the teacher's float16 logits for their positions (N·L, C)."""
    params, task, splits = ran(root)
    x, y = task.inputs(splits.train, splits.schema)[:sequences], task.labels(splits.train, splits.schema)[:sequences]
    teacher = task.load(root / params.paths.teacher)[0].eval()
    t0, out = time.perf_counter(), []
    with torch.inference_mode():
        for i in range(0, len(x), 4):
            out.append(task.cache_logits(teacher, task.cache_batch(teacher, x[i:i + 4])).half())
    return x, y, torch.cat(out), time.perf_counter() - t0


def build(logits: torch.Tensor, s: CacheSettings, store: Path, name: str) -> tuple[LogitCache, float]:
    """The cache of `s` over these logits, built and read by the cache's own code; bytes per token."""
    key = cache_key("bench-teacher", "bench-data", s)
    out = store / name.replace(" ", "_")
    rep = build_cache(lambda a, b: logits[a:b].float(), len(logits), logits.shape[1], out, store, key, s, {})
    size = sum(f.stat().st_size for f in out.glob("shard-*.npy"))
    return LogitCache(out, key), size / rep.rows


def train(root: Path, x: np.ndarray, y: np.ndarray, soft, top_k: int | None, steps: int) -> torch.nn.Module:
    """The project's student, `steps` steps over x from its usual initialisation, loss and optimizer."""
    params, task, splits = ran(root)
    model = task.build(task.spec(params.student, splits.schema), x, params.train.seed, task.init_dir(params, root))
    per = task.positions(x)
    cfg = replace(fit_config(params.train.model_copy(update={"epochs": 1, "min_steps": None, "patience": None}),
                             len(x)), steps=steps, keep_best=False)
    distill = params.distill.model_copy(update={"loss": "hinton", "search": None})
    loss = per_row(losses.build(distill, top_k), per)
    fit(model, x, y, loss, cfg, soft=position_targets(soft, per))
    return model.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("project", type=Path)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--shard", type=int, default=2048, help="cache rows (tokens) per shard")
    args = ap.parse_args()
    root = args.project.resolve()
    params, task, splits = ran(root)
    xt, yt = task.inputs(splits.test, splits.schema), task.labels(splits.test, splits.schema)
    x, y, dense, seconds = teacher_targets(root, args.steps * params.train.batch_size)
    print(f"{len(x)} training sequences x {x.shape[1]} tokens ({len(dense)} cached rows, teacher {seconds:.0f} s), "
          f"{args.steps} steps of {params.train.batch_size}; {yt.size} held-out tokens; student "
          f"{params.student.arch} {dict(params.student.options)}, alpha {params.distill.alpha}, "
          f"T {params.distill.temperature}\n", flush=True)
    results = {}
    t0 = time.perf_counter()
    model = train(root, x, y, lambda pos: dense[pos].float().numpy(), None, args.steps)
    results["full vocabulary (online KD's targets)"] = (dense.shape[1] * 2.0, model, time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        for name, s in VARIANTS.items():
            cache, size = build(dense, replace(s, shard_rows=args.shard), Path(tmp), name)
            t0 = time.perf_counter()
            model = train(root, x, y, cache.targets, s.top_k, args.steps)
            results[name] = (size, model, time.perf_counter() - t0)
            print(f"  trained {name} in {results[name][2]:.0f} s", flush=True)
    full = None
    print("\n| targets | bytes/token | held-out perplexity | vs full vocabulary | train s |")
    print("|---|---|---|---|---|")
    for name, (size, model, secs) in results.items():
        nll, _ = lm_eval.nll_per_sequence(model, xt, yt)
        ppl = lm_eval.perplexity(float(nll.sum()), yt.size)
        full = full or ppl
        print(f"| {name} | {size:,.1f} | {ppl:.1f} | {ppl / full - 1:+.1%} | {secs:.0f} |", flush=True)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
