"""train_student: KD from the cached teacher logits over labelled + transfer rows.

The loss is `distill.loss` (kd_core.losses), plus the `distill.features` hints from the cached teacher
features through learned projections that are trained here and never saved (kd_core.features).
With `train.nproc > 1` the stage relaunches itself under torch.distributed.run; started by torchrun
(that relaunch or a user's own), it trains as one rank.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kd_core import data, distributed, features, losses, models, progress, search, tasks, train
from kd_core.cache import LogitCache
from kd_core.config import DistillParams, Params
from kd_core.curves import read_curve, write_curve
from kd_core.fs import atomic_dir
from kd_core.stages._common import (
    StudentResult,
    checkpoint_path,
    discard_checkpoints,
    epoch_logger,
    fit_config,
    labels_only_config,
    log_trial,
)
from kd_core.stages._distil import KDRows, kd_objective, kd_rows
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


def _hinted(distill: DistillParams, cache: LogitCache, model: models.KDModel,
            example: torch.Tensor) -> tuple[nn.Module, train.Extra | None]:
    """The module to train and its extra loss: the bare student unless hints or a weight penalty are asked for."""
    hints = features.plan(distill, cache.features, model, example)
    l2 = losses.l2_weight(distill)
    if not hints and not l2:
        return model, None
    net = features.HintedStudent(model, hints, l2)
    return net, features.extra_loss(net, cache.take_feature)


def _train(params: Params, workdir: Path, task: tasks.Task, rows: KDRows, spec: models.ModelSpec,
           distill: DistillParams, epochs: int | None, world: int) -> tuple[models.KDModel, train.History, int]:
    """One training of a fresh student with `distill` (`epochs`: a search's short budget); returns the
    model, its curve and the epochs a checkpoint restored. Labels alone train as the baseline does: on
    the labelled rows, with as many steps, so a student chosen that way is the baseline's twin."""
    lead = distributed.ranks()[0] == 0
    alone = search.labels_only(distill)
    n = rows.extent(distill)
    model = task.build(spec, rows.x[:n], params.train.seed, task.init_dir(params, workdir))
    cfg = fit_config(params.train, n - len(rows.val))
    if epochs is not None:
        cfg = dataclasses.replace(cfg, epochs=min(epochs, cfg.epochs))
    if alone:  # the baseline's recipe: as many steps as the student, over the labelled rows
        cfg = labels_only_config(params.train, len(rows.x), n, len(rows.val), epochs and cfg.epochs)
        distill = distill.model_copy(update={"features": ()})  # no hints either: the baseline's twin
    if epochs is not None:
        cfg = dataclasses.replace(cfg, patience=None)
    inputs = {"params": params.model_dump(mode="json", include={"student", "train"}),
              "distill": distill.model_dump(mode="json"), "epochs": cfg.epochs, "patience": cfg.patience,
              "cache": rows.keys}
    ckpt = checkpoint_path(workdir, params, "train_student", inputs, world)
    resumed = train.checkpoint_epochs(ckpt)
    loss, soft = kd_objective(distill, rows)
    net, extra = _hinted(distill, rows.caches[0], model, task.example(spec, batch=2))
    name = search.label(distill.alpha, distill.temperature, distill.loss)
    what = "training student" if epochs is None else f"trying {name}"
    history = fit(net, rows.x[:n], rows.y[:n], loss, cfg, soft=soft, val=rows.val,
                  on_epoch=epoch_logger(workdir, "student") if lead and epochs is None else None,
                  progress=progress.bar(what) if lead else None, checkpoint=ckpt, extra=extra,
                  lengths=rows.lengths[:n] if rows.lengths is not None else None)
    if isinstance(net, features.HintedStudent):
        net.release()  # hooks off; `model`, saved below, is the bare student: the projections stay behind
    return model, history, resumed


def _search(params: Params, workdir: Path, task: tasks.Task, rows: KDRows, spec: models.ModelSpec,
            world: int) -> tuple[DistillParams, list[search.Trial], int, float | None]:
    """Try every candidate setting briefly; each one's curve becomes a child run of the DAG run. Returns
    the setting kept, the trials, its index and its p-value against labels alone."""
    cfg = params.distill.search
    settings, trials, right = search.candidates(params.distill), [], []
    for d in settings:
        model, history, _ = _train(params, workdir, task, rows, spec, d, cfg.epochs, world)
        trials.append(search.trial(d, history, train.best_epoch(history)))
        right.append(_right(task, model, rows))
        if distributed.ranks()[0] == 0:
            log_trial(workdir, trials[-1], history)
    chosen, p = search.best(trials, task.headline), None
    if task.headline == "accuracy":  # lm ranks by perplexity over many tokens: no per-row gate
        alone = next(i for i, d in enumerate(settings) if search.labels_only(d))
        chosen, p = search.guarded(chosen, alone, right, cfg.max_p_value)
    return settings[chosen], trials, chosen, p


def _right(task: tasks.Task, model: models.KDModel, rows: KDRows) -> np.ndarray:
    """Per validation row: classified right (classifiers only; lm rows are not scored here).  # (V,)"""
    if task.headline != "accuracy":
        return np.zeros(0, dtype=bool)
    return task.predict_logits(model, rows.x[rows.val]).argmax(1) == rows.y[rows.val]


def _distil(params: Params, workdir: Path, rank: int, world: int) -> StudentResult:
    """One rank's training; rank 0 alone logs, checkpoints and writes the outputs."""
    task = tasks.for_params(params)
    splits = data.read_prepared(workdir / params.paths.prepared)
    rows = kd_rows(params, workdir, task, splits)
    spec = task.spec(params.student, splits.schema)
    distill, trials, chosen, p_value = params.distill, [], -1, None
    if params.distill.search is not None:
        distill, trials, chosen, p_value = _search(params, workdir, task, rows, spec, world)
    model, history, resumed = _train(params, workdir, task, rows, spec, distill, None, world)
    if rank == 0:
        with atomic_dir(workdir / params.paths.student) as out:
            task.save(model, spec, out)
            if trials:
                search.write(out / search.SEARCH_FILE, trials, chosen, params.distill.search.epochs, p_value)
        write_curve(history, workdir / params.paths.metrics / CURVE)
        discard_checkpoints(workdir, params, "train_student")
    result = StudentResult.from_history("student", spec.arch, history, resumed, world)
    return dataclasses.replace(result, setting=trials[chosen].label if trials else None)
