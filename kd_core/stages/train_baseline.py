"""train_baseline: the student architecture on hard labels only, the control that proves KD helped."""

from __future__ import annotations

from pathlib import Path

from kd_core import data, losses, models
from kd_core.config import Params
from kd_core.stages import atomic_dir
from kd_core.stages._common import epoch_logger, fit_config, labelled_arrays, write_curve
from kd_core.stages.train_student import StudentResult
from kd_core.train import fit


def run(params: Params, workdir: Path) -> StudentResult:
    """Same architecture, optimiser and number of optimiser steps as the student, hard labels only.

    The student sees labelled + transfer rows per epoch; giving the baseline as many steps over the
    labelled rows keeps the comparison about the labels, not about the training budget.
    """
    splits = data.read_prepared(workdir / params.paths.prepared)
    x, y = labelled_arrays(splits)
    rows_student = len(splits.train) + len(splits.transfer)
    epochs = max(1, round(params.train.epochs * rows_student / max(len(x), 1)))
    cfg = fit_config(params.train.model_copy(update={"epochs": epochs}))
    spec = models.ModelSpec(params.student.arch, dict(params.student.options), splits.schema)
    model = models.build(spec, x, params.train.seed)
    history = fit(model, x, y, lambda s, _t, yb: losses.hard_ce(s, yb), cfg,
                  on_epoch=epoch_logger(workdir, "baseline"))
    with atomic_dir(workdir / params.paths.baseline) as out:
        models.save(model, spec, out)
    write_curve(history, workdir / params.paths.metrics / "train_baseline.csv")
    return StudentResult("baseline", spec.arch, len(x), len(history), history[-1]["loss"],
                         sum(h["seconds"] for h in history))
