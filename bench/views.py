"""The view cache against online KD with the same augmentation (issue 25): same student, same epochs.

    .venv/bin/python bench/views.py PROJECT [--images 12000] [--epochs 4]

PROJECT is an image project that ran `prepare` and `teacher` (e.g. the image example after `make image`,
or `kd stage prepare && kd stage teacher` with examples/image/params.yaml). Both students start from the
same initialisation and see the same images in the same order, each epoch one augmented view per image
drawn from the project's `cache.augment` recipe:

- **cache**: the teacher labels `epochs` views per image once (the view cache, cache.views = epochs); epoch e
  replays view e of every image: the student's step alone;
- **online**: every epoch draws new views and the teacher runs on each batch before the student's step
  (what torchdistill-style pipelines do).

Printed: seconds per epoch of each and their ratio (the cache's one-off teacher pass separately), test
accuracy of both students, and the cache's bytes per view (logits in `cache.dtype` + the 5 view numbers).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from kd_core import data, losses, tasks
from kd_core.cache.format import storage_dtype
from kd_core.config import load_params
from kd_core.tasks.image import views

BATCH_TEACHER = 512


@torch.inference_mode()
def teacher_logits(teacher: torch.nn.Module, x: np.ndarray) -> torch.Tensor:
    """The teacher's logits for pixel rows (..., C, S, S), in batches.  # -> (..., K)"""
    flat = x.reshape(-1, *x.shape[-3:])
    out = torch.cat([teacher(torch.from_numpy(flat[i:i + BATCH_TEACHER])) for i in range(0, len(flat), BATCH_TEACHER)])
    return out.reshape(*x.shape[:-3], -1)


def train(student: torch.nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, batch: int, lr: float,
          targets, seed: int) -> list[float]:
    """AdamW, cosine-decayed; `targets(epoch, rows) -> (views (b, C, S, S), teacher logits (b, K))`.
    Returns the seconds of each epoch (student step plus whatever `targets` costs)."""
    rng = np.random.default_rng(seed)
    steps = epochs * -(-len(x) // batch)
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    kd = lambda s, t, yb: losses.hinton_kd(s, t, yb, 4.0, 0.5)  # noqa: E731  (the example's T and alpha)
    seconds = []
    student.train()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        order = rng.permutation(len(x))
        for i in range(0, len(x), batch):
            rows = order[i:i + batch]
            xb, tb = targets(epoch, rows)
            loss = kd(student(torch.from_numpy(xb)), tb, torch.from_numpy(y[rows])).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        seconds.append(time.perf_counter() - t0)
    return seconds


def accuracy(task, model: torch.nn.Module, splits: data.Splits) -> float:
    x, y = task.inputs(splits.test, splits.schema), task.labels(splits.test, splits.schema)
    return float((task.predict_logits(model, x).argmax(1) == y).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("project", type=Path)
    ap.add_argument("--images", type=int, default=12_000, help="labelled + transfer images used (the first N)")
    ap.add_argument("--epochs", type=int, default=4, help="epochs of each student (= views cached per image)")
    args = ap.parse_args()
    root = args.project.resolve()
    params = load_params(root)
    task = tasks.for_params(params)
    if not task.views:
        raise SystemExit(f"{root}: task {params.task} has no augmented views")
    splits = data.read_prepared(root / params.paths.prepared)
    x = task.cache_inputs(splits)[:args.images]  # (N, C, S, S) labelled first, then transfer
    n_lab = min(len(splits.train), len(x))
    y = np.full(len(x), losses.UNLABELLED, np.int64)
    y[:n_lab] = task.labels(splits.train, splits.schema)[:n_lab]
    teacher = task.load(root / params.paths.teacher)[0].eval()
    augment, e = params.cache.augment.model_dump(mode="json"), args.epochs
    spec = task.spec(params.student, splits.schema, root)

    t0 = time.perf_counter()  # the view cache: E views per image, rendered and labelled once
    cached_views = views.render(x, views.draw(len(x), e, augment))  # (N, E, C, S, S)
    cached_logits = teacher_logits(teacher, cached_views)  # (N, E, K)
    build = time.perf_counter() - t0
    replay = lambda epoch, rows: (cached_views[rows, epoch], cached_logits[rows, epoch])  # noqa: E731
    student_c = task.build(spec, None, params.train.seed)
    sec_c = train(student_c, x, y, e, params.train.batch_size, params.train.lr, replay, params.train.seed)

    online_params = [views.draw(len(x), 1, {**augment, "seed": augment["seed"] + 1000 + i}) for i in range(e)]

    def online(epoch: int, rows: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        xb = views.render(x[rows], online_params[epoch][rows])[:, 0]  # (b, C, S, S) fresh views
        return xb, teacher_logits(teacher, xb)  # the teacher in the loop

    student_o = task.build(spec, None, params.train.seed)
    sec_o = train(student_o, x, y, e, params.train.batch_size, params.train.lr, online, params.train.seed)

    acc_c, acc_o = accuracy(task, student_c, splits), accuracy(task, student_o, splits)
    k = len(splits.schema.classes)
    per_view = k * storage_dtype(params.cache.dtype).itemsize + 4 * len(views.COLUMNS)
    print(f"{len(x):,} images ({n_lab:,} labelled), {e} epochs, student {params.student.arch} "
          f"{dict(params.student.options)}, teacher {params.teacher.arch} {dict(params.teacher.options)}, "
          f"{torch.get_num_threads()} threads")
    cached = f"view cache ({e} views/image; one-off teacher pass {build:.1f} s)"
    print(f"| | s/epoch (median) | test accuracy |\n|---|---|---|\n"
          f"| {cached} | {np.median(sec_c):.1f} | {acc_c:.4f} |\n"
          f"| online KD (teacher in the loop) | {np.median(sec_o):.1f} | {acc_o:.4f} |")
    print(f"per-epoch speed-up {np.median(sec_o) / np.median(sec_c):.2f}x (target >= 3x); "
          f"end to end incl. the cache's teacher pass {sum(sec_o) / (sum(sec_c) + build):.2f}x; "
          f"accuracy cache - online {100 * (acc_c - acc_o):+.2f} points (target within 0.5); "
          f"{per_view} bytes per view ({k} logits in {params.cache.dtype} + {len(views.COLUMNS)} float32 view numbers)")


if __name__ == "__main__":
    main()
