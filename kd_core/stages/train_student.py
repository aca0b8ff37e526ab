"""train_student: Hinton KD from the cached teacher logits over labelled + transfer rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd_core import data, losses, models
from kd_core.config import Params
from kd_core.logits import LogitCache
from kd_core.stages import atomic_dir
from kd_core.stages._common import epoch_logger, fit_config, labelled_arrays, write_curve
from kd_core.stages.cache_logits import cache_rows, expected_key
from kd_core.train import fit


@dataclass(frozen=True)
class StudentResult:
    name: str
    arch: str
    rows: int
    epochs: int
    final_loss: float
    seconds: float

    def summary(self) -> str:
        return (f"{self.name} {self.arch}: {self.epochs} epochs over {self.rows} rows in "
                f"{self.seconds:.1f} s, final loss {self.final_loss:.4f}")


def run(params: Params, workdir: Path) -> StudentResult:
    splits = data.read_prepared(workdir / params.paths.prepared)
    cache = LogitCache(workdir / params.paths.logits, expected_key(params, workdir))
    _, y_lab = labelled_arrays(splits)
    x = cache_rows(splits)  # (N, F): labelled rows first, then transfer rows, as cached
    y = np.concatenate([y_lab, np.full(len(splits.transfer), losses.UNLABELLED)])  # (N,)
    T, alpha = params.distill.temperature, params.distill.alpha
    spec = models.ModelSpec(params.student.arch, dict(params.student.options), splits.schema)
    model = models.build(spec, x, params.train.seed)
    history = fit(model, x, y, lambda s, t, yb: losses.hinton_kd(s, t, yb, T, alpha),
                  fit_config(params.train), soft=cache.take, on_epoch=epoch_logger(workdir, "student"))
    with atomic_dir(workdir / params.paths.student) as out:
        models.save(model, spec, out)
    write_curve(history, workdir / params.paths.metrics / "train_student.csv")
    return StudentResult("student", spec.arch, len(x), len(history), history[-1]["loss"],
                         sum(h["seconds"] for h in history))
