"""train_student: KD from the cached teacher logits over labelled + transfer rows.

The loss is `distill.loss` (kd_core.losses), plus the `distill.features` hints from the cached teacher
features through learned projections that are trained here and never saved (kd_core.features).
With `train.nproc > 1` the stage relaunches itself under torch.distributed.run; started by torchrun
(that relaunch or a user's own), it trains as one rank.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kd_core import data, distributed, features, losses, models, progress, tasks, train
from kd_core.cache import LogitCache, expected_keys
from kd_core.config import Params
from kd_core.curves import read_curve, write_curve
from kd_core.fs import atomic_dir
from kd_core.stages._common import (
    StudentResult,
    checkpoint_path,
    discard_checkpoints,
    epoch_logger,
    fit_config,
    labelled_arrays,
    per_row,
    position_targets,
    validation_rows,
)
from kd_core.train import fit

CURVE = "train_student.csv"


def run(params: Params, workdir: Path) -> StudentResult:
    """Distil the student; with `train.nproc > 1` on that many processes (DDP), reporting rank 0's curve.

    The relaunched ranks are `kd stage train_student` processes: they read params.yaml in `workdir`.
    """
    if params.train.nproc > 1 and not distributed.launched():
        distributed.launch(params.train.nproc, ["-m", "kd_core.cli", "stage", "train_student"], workdir)
        history = read_curve(workdir / params.paths.metrics / CURVE)
        return StudentResult.from_history("student", params.student.arch, history, None, params.train.nproc)
    with distributed.process_group(params.train.device) as (rank, world):
        return _distil(params, workdir, rank, world)


def _hinted(params: Params, cache: LogitCache, model: models.KDModel,
            example: torch.Tensor) -> tuple[nn.Module, train.Extra | None]:
    """The module to train and its extra loss: the bare student unless hints or a weight penalty are asked for."""
    hints = features.plan(params.distill, cache.features, model, example)
    l2 = losses.l2_weight(params.distill)
    if not hints and not l2:
        return model, None
    net = features.HintedStudent(model, hints, l2)
    return net, features.extra_loss(net, cache.take_feature)


def _distil(params: Params, workdir: Path, rank: int, world: int) -> StudentResult:
    """One rank's training; rank 0 alone logs, checkpoints and writes the outputs."""
    task = tasks.for_params(params)
    splits = data.read_prepared(workdir / params.paths.prepared)
    keys = expected_keys(params, workdir)
    caches = [LogitCache(workdir / d, k) for d, k in zip(params.logit_dirs(), keys, strict=True)]
    _, y_lab = labelled_arrays(task, splits)
    x = task.cache_inputs(splits)  # (N, ...): labelled rows first, then transfer rows, as cached
    y = np.concatenate([y_lab, np.full((len(splits.transfer), *y_lab.shape[1:]), losses.UNLABELLED)])  # (N, ...)
    per = task.positions(x)  # cache rows per row
    val = validation_rows(len(y_lab), params.train.val_fraction, params.train.seed)  # (V,)
    spec = task.spec(params.student, splits.schema)
    model = task.build(spec, x, params.train.seed, task.init_dir(params, workdir))
    inputs = {"params": params.model_dump(mode="json", include={"student", "distill", "train"}), "cache": keys}
    ckpt = checkpoint_path(workdir, params, "train_student", inputs, world)
    resumed, lead = train.checkpoint_epochs(ckpt), rank == 0
    loss = per_row(losses.build(params.distill, caches[0].top_k), per)  # a top-k cache: the top-k-aware KL
    one = caches[0].targets if losses.reads_topk(params.distill, caches[0].top_k) else caches[0].take
    soft = position_targets(one, per) if len(caches) == 1 else functools.partial(
        losses.ensemble_targets, [c.take for c in caches], params.distill.ensemble)
    net, extra = _hinted(params, caches[0], model, task.example(spec, batch=2))
    history = fit(net, x, y, loss, fit_config(params.train, len(x) - len(val)), soft=soft, val=val,
                  on_epoch=epoch_logger(workdir, "student") if lead else None,
                  progress=progress.bar("training student") if lead else None, checkpoint=ckpt, extra=extra,
                  lengths=task.lengths(x, splits.schema))
    if isinstance(net, features.HintedStudent):
        net.release()  # hooks off; `model`, saved below, is the bare student: the projections stay behind
    if lead:
        with atomic_dir(workdir / params.paths.student) as out:
            task.save(model, spec, out)
        write_curve(history, workdir / params.paths.metrics / CURVE)
        discard_checkpoints(workdir, params, "train_student")
    return StudentResult.from_history("student", spec.arch, history, resumed, world)
