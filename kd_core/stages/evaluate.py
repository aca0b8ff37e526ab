"""evaluate: teacher, student and baseline on the test rows -> metrics/eval.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd_core import data, models, tasks
from kd_core.config import Params
from kd_core.fs import atomic_write_text

ROLES = ("teacher", "student", "baseline")


@dataclass(frozen=True)
class EvalResult:
    metrics: dict

    def summary(self) -> str:
        members = [f"teachers.{i} {m['accuracy']:.3f}" for i, m in enumerate(self.metrics.get("teachers", []))]
        return "accuracy " + ", ".join([f"{r} {self.metrics[r]['accuracy']:.3f}" for r in ROLES] + members)


def run(params: Params, workdir: Path) -> EvalResult:
    task = tasks.for_params(params)
    splits = data.read_prepared(workdir / params.paths.prepared)
    x = task.inputs(splits.test, splits.schema)  # (N, ...)
    y = task.labels(splits.test, splits.schema)  # (N,)
    dirs = {"teacher": params.paths.teacher, "student": params.paths.student,
            "baseline": params.paths.baseline}
    loaded = {r: task.load(workdir / dirs[r]) for r in ROLES}
    logits = {r: task.predict_logits(m, x) for r, (m, _) in loaded.items()}
    teacher_pred = logits["teacher"].argmax(1)
    result = {r: task.metrics(m, spec, logits[r], y, teacher_pred, workdir / dirs[r] / models.WEIGHTS_FILE)
              for r, (m, spec) in loaded.items()}
    if params.teachers:  # `teacher` is the ensemble; each member is scored on its own as well
        result["teachers"] = [_member(task, workdir / d, x, y, teacher_pred) for d in params.teacher_dirs()]
    atomic_write_text(workdir / params.paths.metrics / "eval.json", json.dumps(result, indent=2) + "\n")
    return EvalResult(result)


def _member(task: tasks.Task, model_dir: Path, x: np.ndarray, y: np.ndarray, ensemble_pred: np.ndarray) -> dict:
    """One ensemble member's metrics; its agreement is with the ensemble the student learned from."""
    model, spec = task.load(model_dir)
    return {"arch": spec.arch, **task.metrics(model, spec, task.predict_logits(model, x), y, ensemble_pred,
                                               model_dir / models.WEIGHTS_FILE)}
