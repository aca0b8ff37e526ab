"""evaluate: teacher, student and baseline on the test rows -> metrics/eval.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd_core import data, models
from kd_core.config import Params
from kd_core.evaluate import model_metrics
from kd_core.stages import atomic_write_text

ROLES = ("teacher", "student", "baseline")


@dataclass(frozen=True)
class EvalResult:
    metrics: dict

    def summary(self) -> str:
        members = [f"teachers.{i} {m['accuracy']:.3f}" for i, m in enumerate(self.metrics.get("teachers", []))]
        return "accuracy " + ", ".join([f"{r} {self.metrics[r]['accuracy']:.3f}" for r in ROLES] + members)


def run(params: Params, workdir: Path) -> EvalResult:
    splits = data.read_prepared(workdir / params.paths.prepared)
    x = data.features_array(splits.test, splits.schema)  # (N, F)
    y = data.label_indices(splits.test, splits.schema)  # (N,)
    dirs = {"teacher": params.paths.teacher, "student": params.paths.student,
            "baseline": params.paths.baseline}
    loaded = {r: models.load(workdir / dirs[r])[0] for r in ROLES}
    logits = {r: models.predict_logits(m, x) for r, m in loaded.items()}
    teacher_pred = logits["teacher"].argmax(1)
    result = {r: model_metrics(loaded[r], x.shape[1], logits[r], y, teacher_pred, splits.schema.classes,
                               workdir / dirs[r] / models.WEIGHTS_FILE) for r in ROLES}
    if params.teachers:  # `teacher` is the ensemble; each member is scored on its own as well
        result["teachers"] = [_member(workdir / d, x, y, teacher_pred, splits.schema.classes)
                              for d in params.teacher_dirs()]
    atomic_write_text(workdir / params.paths.metrics / "eval.json", json.dumps(result, indent=2) + "\n")
    return EvalResult(result)


def _member(model_dir: Path, x: np.ndarray, y: np.ndarray, ensemble_pred: np.ndarray, classes: tuple) -> dict:
    """One ensemble member's metrics; its agreement is with the ensemble the student learned from."""
    model, spec = models.load(model_dir)
    return {"arch": spec.arch, **model_metrics(model, x.shape[1], models.predict_logits(model, x), y, ensemble_pred,
                                                classes, model_dir / models.WEIGHTS_FILE)}
