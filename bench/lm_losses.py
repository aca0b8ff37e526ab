"""The token-level KD losses side by side on one `task: lm` project's cache (issue 16).

    .venv/bin/python bench/lm_losses.py PROJECT [--epochs 1] [--sequences 128]

PROJECT is a project that ran `prepare`, `teacher` and `cache_logits` (e.g. the lm example after
`make lm`). Each loss — forward KL (`hinton`), reverse KL, JSD(0.5), skew KL(0.1) — trains the
configured student from the same cache (the teacher never runs again), and the text-only twin
trains on next-token cross-entropy alone, same initialisation, sequences and steps. All are scored
on the same held-out sequences: perplexity, top-1 agreement with the teacher and KL to it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from _project import ran

from kd_core import losses
from kd_core.cache import LogitCache, expected_keys
from kd_core.stages._common import fit_config, per_row, position_targets, validation_rows
from kd_core.tasks.lm import scoring as lm_eval
from kd_core.train import fit

VARIANTS = ("hinton", "reverse_kl", "jsd", "skew_kl")  # forward KL, reverse KL, JSD(β), skew KL(a)


def train_one(loss_name: str | None, root: Path, epochs: int, sequences: int) -> tuple[torch.nn.Module, float]:
    """A student trained with `loss_name` on the cache (None: the text-only twin); (model, seconds)."""
    params, task, splits = ran(root)
    x, y = task.inputs(splits.train, splits.schema)[:sequences], task.labels(splits.train, splits.schema)[:sequences]
    per = task.positions(x)
    cache = LogitCache(root / params.logit_dirs()[0], expected_keys(params, root)[0])
    model = task.build(task.spec(params.student, splits.schema), x, params.train.seed, task.init_dir(params, root))
    val = validation_rows(len(x), params.train.val_fraction, params.train.seed)
    cfg = fit_config(params.train.model_copy(update={"epochs": epochs, "min_steps": None}), len(x) - len(val))
    if loss_name is None:
        loss, soft = per_row(lambda s, _t, yb: losses.hard_ce(s, yb), per), None
    else:
        distill = params.distill.model_copy(update={"loss": loss_name})
        loss = per_row(losses.build(distill, cache.top_k), per)
        soft = position_targets(cache.targets, per)
    t0 = time.perf_counter()
    fit(model, x, y, loss, cfg, soft=soft, val=val)
    return model, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("project", type=Path)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--sequences", type=int, default=128, help="training sequences (the first N of the cache)")
    args = ap.parse_args()
    root = args.project.resolve()
    params, task, splits = ran(root)
    xt, yt = task.inputs(splits.test, splits.schema), task.labels(splits.test, splits.schema)
    teacher = task.load(root / params.paths.teacher)[0]
    print(f"{params.student.arch} {dict(params.student.options)}, {args.sequences} sequences x "
          f"{task.positions(xt)} tokens, {args.epochs} epoch(s); {len(xt)} held-out sequences; "
          f"alpha {params.distill.alpha}, T {params.distill.temperature}, top-{params.cache.top_k} cache")
    models, seconds = {"teacher": teacher}, {}
    for name in (*VARIANTS, None):
        label = name or "text-only twin"
        models[label], seconds[label] = train_one(name, root, args.epochs, args.sequences)
        print(f"  trained {label} in {seconds[label]:.0f} s", flush=True)
    scores = lm_eval.sequence_scores(models, xt, yt)
    twin = lm_eval.perplexity(scores["text-only twin"]["nll"].sum(), yt.size)
    print("\n| loss | perplexity | vs twin | agreement with teacher | KL to teacher | train s |")
    print("|---|---|---|---|---|---|")
    for label, r in scores.items():
        ppl = lm_eval.perplexity(r["nll"].sum(), yt.size)
        print(f"| {label} | {ppl:.2f} | {ppl / twin:.3f} | {r['agree'].sum() / yt.size:.3f} | "
              f"{r['kl'].sum() / yt.size:.3f} | {seconds.get(label, float('nan')):.0f} |")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
