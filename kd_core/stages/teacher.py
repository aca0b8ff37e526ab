"""teacher: train the teacher on the labelled rows, or load one (kd model directory, weights file, MLflow URI)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.nn.functional as F

from kd_core import data, features, models, progress, tasks
from kd_core.config import MEMBERS, Params, TeacherParams
from kd_core.errors import UserError
from kd_core.fs import atomic_dir
from kd_core.stages._common import epoch_logger, epochs_for, labelled_arrays
from kd_core.train import FitConfig, fit


@dataclass(frozen=True)
class TeacherResult:
    arch: str
    source: str
    train_accuracy: float | None
    params: int

    def summary(self) -> str:
        acc = f", train accuracy {self.train_accuracy:.3f}" if self.train_accuracy is not None else ""
        return f"teacher {self.arch} from {self.source}: {self.params:,} parameters{acc}"


def _is_mlflow_uri(source: str) -> bool:
    return source.startswith(("models:/", "runs:/", "mlflow-artifacts:/"))


def run(params: Params, workdir: Path) -> TeacherResult:
    """The teacher; with a `teachers` list each member in its own directory, plus their ensemble as
    the teacher directory's model, so evaluation and export treat it as one teacher."""
    splits = data.read_prepared(workdir / params.paths.prepared)
    with atomic_dir(workdir / params.paths.teacher) as out:
        if not params.teachers:
            return _one(params.teacher, params.train.seed, "teacher", params, splits, workdir, out)
        results, members = [], []
        for i, tp in enumerate(params.teachers):  # seed + i: two members of one architecture still differ
            results.append(_one(tp, params.train.seed + i, f"teachers.{i}", params, splits, workdir,
                                out / MEMBERS / str(i)))
            members.append(models.load(out / MEMBERS / str(i)))
        model, spec = models.ensemble(members, params.distill.ensemble)
        models.save(model, spec, out)
        return TeacherResult(f"ensemble of {' + '.join(r.arch for r in results)} ({params.distill.ensemble})",
                             ", ".join(r.source for r in results), None, sum(r.params for r in results))


def _one(tp: TeacherParams, seed: int, name: str, params: Params, splits: data.Splits, workdir: Path,
         out: Path) -> TeacherResult:
    """Train one teacher on the labelled rows, or load it from a directory, weights file or MLflow URI."""
    out.mkdir(parents=True, exist_ok=True)
    task = tasks.for_params(params)
    if tp.source == "train":
        x, y = labelled_arrays(task, splits)
        spec = task.spec(tp, splits.schema, workdir)
        init = task.init_dir(params, workdir)
        model = task.for_training(task.build(spec, x, seed, init), params)
        features.check(params, model, splits.schema, init, workdir)  # a bad feature name costs no training
        epochs = epochs_for(tp.epochs, tp.min_steps, len(x), tp.batch_size)
        cfg = FitConfig(epochs, tp.batch_size, tp.lr, tp.weight_decay, seed, params.train.device)
        history = fit(model, x, y, lambda s, _t, yb: F.cross_entropy(s, yb, reduction="none"), cfg,
                      on_epoch=epoch_logger(workdir, name), progress=progress.bar(f"training {name}"),
                      lengths=task.lengths(x, splits.schema))
        task.save(model, spec, out)
        return TeacherResult(spec.arch, "train", history[-1]["accuracy"], sum(p.numel() for p in model.parameters()))
    if _is_mlflow_uri(tp.source):
        from kd_core import serving

        src = serving.download_model_dir(tp.source, workdir / params.paths.work / f"{name}-download", root=workdir)
    else:
        src = task.teacher_source(tp.source, workdir)
    if not src.exists():
        raise UserError(f"{name}.source {tp.source} not found")
    model = task.adopt(src, tp, splits.schema, out)
    return TeacherResult(task.spec(tp, splits.schema, workdir).arch, tp.source, None,
                         sum(p.numel() for p in model.parameters()))
