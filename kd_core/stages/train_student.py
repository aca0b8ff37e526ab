"""train_student: KD from the cached teacher logits over labelled + transfer rows.

The loss is `distill.loss` (kd_core.losses), plus the `distill.features` hints from the cached teacher
features through learned projections that are trained here and never saved (kd_core.features).
With `train.nproc > 1` the stage relaunches itself under torch.distributed.run; started by torchrun
(that relaunch or a user's own), it trains as one rank.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from kd_core import data, features, losses, models, progress, train
from kd_core.config import Params
from kd_core.logits import LogitCache
from kd_core.stages import atomic_dir
from kd_core.stages._common import (
    checkpoint_path,
    discard_checkpoints,
    epoch_logger,
    fit_config,
    labelled_arrays,
    read_curve,
    validation_rows,
    write_curve,
)
from kd_core.stages.cache_logits import cache_rows, expected_keys
from kd_core.train import History, fit

CURVE = "train_student.csv"


@dataclass(frozen=True)
class StudentResult:
    name: str
    arch: str
    epochs: int
    best_epoch: int
    val_accuracy: float | None  # of the kept epoch; None without a validation split
    final_loss: float
    seconds: float
    processes: int
    resumed_from: int | None  # epochs restored from a checkpoint; None: not known (the relaunching parent)

    @classmethod
    def from_history(cls, name: str, arch: str, history: History, resumed_from: int | None,
                     processes: int) -> StudentResult:
        best = train.best_epoch(history)
        return cls(name, arch, len(history), best, history[best - 1].get("val_accuracy"), history[-1]["loss"],
                   sum(h["seconds"] for h in history), processes, resumed_from)

    def summary(self) -> str:
        resumed = f", resumed after epoch {self.resumed_from}" if self.resumed_from else ""
        procs = f" on {self.processes} processes" if self.processes > 1 else ""
        kept = "" if self.val_accuracy is None else \
            f"; kept epoch {self.best_epoch} (validation accuracy {self.val_accuracy:.3f})"
        return (f"{self.name} {self.arch}: {self.epochs} epochs{resumed}{procs} in {self.seconds:.1f} s, "
                f"final loss {self.final_loss:.4f}{kept}")


def run(params: Params, workdir: Path) -> StudentResult:
    """Distil the student; with `train.nproc > 1` on that many processes (DDP), reporting rank 0's curve.

    The relaunched ranks are `kd stage train_student` processes: they read params.yaml in `workdir`.
    """
    if params.train.nproc > 1 and not train.launched():
        train.launch(params.train.nproc, ["-m", "kd_core.cli", "stage", "train_student"], workdir)
        history = read_curve(workdir / params.paths.metrics / CURVE)
        return StudentResult.from_history("student", params.student.arch, history, None, params.train.nproc)
    with train.process_group(params.train.device) as (rank, world):
        return _distil(params, workdir, rank, world)


def _hinted(params: Params, cache: LogitCache, model: models.KDModel,
            n_features: int) -> tuple[nn.Module, train.Extra | None]:
    """The module to train and its extra loss: the bare student unless hints or a weight penalty are asked for."""
    hints = features.plan(params.distill, cache.features, model, n_features)
    l2 = losses.l2_weight(params.distill)
    if not hints and not l2:
        return model, None
    net = features.HintedStudent(model, hints, l2)
    return net, features.extra_loss(net, cache.take_feature)


def _distil(params: Params, workdir: Path, rank: int, world: int) -> StudentResult:
    """One rank's training; rank 0 alone logs, checkpoints and writes the outputs."""
    splits = data.read_prepared(workdir / params.paths.prepared)
    keys = expected_keys(params, workdir)
    caches = [LogitCache(workdir / d, k) for d, k in zip(params.logit_dirs(), keys, strict=True)]
    _, y_lab = labelled_arrays(splits)
    x = cache_rows(splits)  # (N, F): labelled rows first, then transfer rows, as cached
    y = np.concatenate([y_lab, np.full(len(splits.transfer), losses.UNLABELLED)])  # (N,)
    val = validation_rows(len(y_lab), params.train.val_fraction, params.train.seed)  # (V,)
    spec = models.ModelSpec(params.student.arch, dict(params.student.options), splits.schema)
    model = models.build(spec, x, params.train.seed)
    inputs = {"params": params.model_dump(mode="json", include={"student", "distill", "train"}), "cache": keys}
    ckpt = checkpoint_path(workdir, params, "train_student", inputs, world)
    resumed, lead = train.checkpoint_epochs(ckpt), rank == 0
    loss = losses.build(params.distill, caches[0].top_k)  # a top-k cache gets the top-k-aware KL
    soft = caches[0].take if len(caches) == 1 else functools.partial(
        losses.ensemble_targets, [c.take for c in caches], params.distill.ensemble, params.distill.temperature)
    net, extra = _hinted(params, caches[0], model, len(splits.schema.features))
    history = fit(net, x, y, loss, fit_config(params.train), soft=soft, val=val,
                  on_epoch=epoch_logger(workdir, "student") if lead else None,
                  progress=progress.bar("training student") if lead else None, checkpoint=ckpt, extra=extra)
    if isinstance(net, features.HintedStudent):
        net.release()  # hooks off; `model`, saved below, is the bare student: the projections stay behind
    if lead:
        with atomic_dir(workdir / params.paths.student) as out:
            models.save(model, spec, out)
        write_curve(history, workdir / params.paths.metrics / CURVE)
        discard_checkpoints(workdir, params, "train_student")
    return StudentResult.from_history("student", spec.arch, history, resumed, world)
