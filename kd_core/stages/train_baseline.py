"""train_baseline: the student architecture on hard labels only, the control that proves KD helped."""

from __future__ import annotations

from pathlib import Path

from kd_core import data, losses, progress, tasks, train
from kd_core.config import Params
from kd_core.curves import write_curve
from kd_core.fs import atomic_dir
from kd_core.stages._common import (
    WHERE,
    StudentResult,
    checkpoint_path,
    discard_checkpoints,
    epoch_logger,
    labelled_arrays,
    labels_only_config,
    per_row,
    validation_rows,
)
from kd_core.train import fit


def run(params: Params, workdir: Path) -> StudentResult:
    """Same architecture, optimiser, validation rows and number of optimiser steps as the student,
    hard labels only.

    The student sees labelled + transfer rows per epoch; giving the baseline as many steps over the
    labelled rows (and a patience of as many steps) keeps the comparison about the labels, not about
    the training budget.
    """
    task = tasks.for_params(params)
    splits = data.read_prepared(workdir / params.paths.prepared)
    x, y = labelled_arrays(task, splits)
    tp = params.train
    val = validation_rows(len(x), tp.val_fraction, tp.seed)  # (V,)
    cfg = labels_only_config(tp, len(splits.train) + len(splits.transfer), len(x), len(val))
    spec = task.spec(params.student, splits.schema, workdir)
    model = task.for_training(task.build(spec, x, tp.seed, task.init_dir(params, workdir)), params)
    inputs = {"params": params.model_dump(mode="json", include={"student", "train", "cache"}, exclude=WHERE),
              "data": data.data_fingerprint(workdir / params.paths.prepared)}
    ckpt = checkpoint_path(workdir, params, "train_baseline", inputs, 1)
    resumed = train.checkpoint_epochs(ckpt)
    loss = per_row(lambda s, _t, yb: losses.hard_ce(s, yb), task.positions(x))
    history = fit(model, x, y, loss, cfg, val=val,
                  on_epoch=epoch_logger(workdir, "baseline"), progress=progress.bar("training baseline"),
                  checkpoint=ckpt, lengths=task.lengths(x, splits.schema))
    with atomic_dir(workdir / params.paths.baseline) as out:
        task.save(model, spec, out)
    write_curve(history, workdir / params.paths.metrics / "train_baseline.csv")
    discard_checkpoints(workdir, params, "train_baseline")
    return StudentResult.from_history("baseline", spec.arch, history, resumed, 1)
