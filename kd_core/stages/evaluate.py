"""evaluate: teacher, student and baseline on the test rows -> metrics/eval.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd_core import data, models, tasks
from kd_core.config import Params
from kd_core.fs import atomic_write_text

ROLES = ("teacher", "student", "baseline")


@dataclass(frozen=True)
class EvalResult:
    metrics: dict

    def summary(self) -> str:
        key = "perplexity" if "perplexity" in self.metrics["student"] else "accuracy"
        members = [f"teachers.{i} {m[key]:.3f}" for i, m in enumerate(self.metrics.get("teachers", []))]
        return f"{key} " + ", ".join([f"{r} {self.metrics[r][key]:.3f}" for r in ROLES] + members)


def run(params: Params, workdir: Path) -> EvalResult:
    task = tasks.for_params(params)
    splits = data.read_prepared(workdir / params.paths.prepared)
    dirs = {"teacher": params.paths.teacher, "student": params.paths.student,
            "baseline": params.paths.baseline}
    dirs |= {f"teachers.{i}": d for i, d in enumerate(params.teacher_dirs())} if params.teachers else {}
    loaded = {r: task.load(workdir / d) for r, d in dirs.items()}
    # members' agreement is with the ensemble the student learned from, `teacher`
    scored = task.score(loaded, splits, {r: workdir / d / models.WEIGHTS_FILE for r, d in dirs.items()})
    result: dict[str, Any] = {r: scored[r] for r in ROLES}
    if params.teachers:  # `teacher` is the ensemble; each member is scored on its own as well
        result["teachers"] = [{"arch": loaded[f"teachers.{i}"][1].arch, **scored[f"teachers.{i}"]}
                              for i in range(len(params.teachers))]
    atomic_write_text(workdir / params.paths.metrics / "eval.json", json.dumps(result, indent=2) + "\n")
    return EvalResult(result)
