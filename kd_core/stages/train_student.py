"""train_student: KD from the cached teacher logits over labelled + transfer rows.

The loss is `distill.loss` (kd_core.losses), plus the `distill.features` hints from the cached teacher
features through learned projections that are trained here and never saved (kd_core.features).
With `train.nproc > 1` or `train.nnodes > 1` the stage relaunches itself under torch.distributed.run;
started by torchrun (that relaunch or a user's own), it trains as one rank. On several machines each
runs this stage; machine 0 alone writes the checkpoint and the outputs (docs/multinode.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
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
    WHERE,
    StudentResult,
    checkpoint_path,
    discard_checkpoints,
    epoch_logger,
    fit_config,
    labels_only_config,
    log_trial,
)
from kd_core.stages._distil import KDRows, kd_objective, kd_rows
from kd_core.train import FitConfig, fit

CURVE = "train_student.csv"
SCORE_POSITIONS = 512  # positions per scoring pass of a search candidate (lm: 4 sequences of 128 tokens)


@dataclass(frozen=True)
class HelperResult:
    """What a machine other than machine 0 reports: it trained its share and wrote nothing."""

    node_rank: int
    nnodes: int
    nproc: int

    def summary(self) -> str:
        return (f"machine {self.node_rank} of {self.nnodes} trained its {self.nproc} process(es); "
                "machine 0 wrote the checkpoint and the outputs")


def run(params: Params, workdir: Path) -> StudentResult | HelperResult:
    """Distil the student; with `train.nproc > 1` or `train.nnodes > 1` on that many processes (DDP),
    reporting the curve the writing process wrote (machine 0; the others report only their share).

    The relaunched ranks are `kd stage train_student` processes: they read params.yaml in `workdir`.
    """
    t = params.train
    node = distributed.node_rank(t.node_rank, t.nnodes)
    if (t.nproc > 1 or t.nnodes > 1) and not distributed.launched():
        plan = distributed.Plan(t.nproc, t.nnodes, node, t.rdzv_endpoint, job_id(params))
        distributed.launch(plan, ["-m", "kd_core.cli", "stage", "train_student"], workdir)
        if node != 0:
            return HelperResult(node, t.nnodes, t.nproc)
        history = read_curve(workdir / params.paths.metrics / CURVE)
        return StudentResult.from_history("student", params.student.arch, history, None, t.nproc * t.nnodes)
    with distributed.process_group(t.device, node) as (_, world):
        return _distil(params, workdir, world)


def job_id(params: Params) -> str:
    """The rendezvous id: the same on every machine of one job (node rank and meeting point left out),
    another for other params, so two jobs meeting at one endpoint never mix."""
    digest = hashlib.sha256(json.dumps(params.model_dump(mode="json", exclude=WHERE), sort_keys=True).encode())
    return f"kd-train_student-{digest.hexdigest()[:12]}"


def _hinted(distill: DistillParams, cache: LogitCache, model: nn.Module,
            example: torch.Tensor) -> tuple[nn.Module, train.Extra | None]:
    """The module to train and its extra loss: the bare student unless hints or a weight penalty are asked for."""
    hints = features.plan(distill, cache.features, model, example)
    l2 = losses.l2_weight(distill)
    if not hints and not l2:
        return model, None
    net = features.HintedStudent(model, hints, l2)
    return net, features.extra_loss(net, cache.take_feature)


def _train(params: Params, workdir: Path, task: tasks.Task, rows: KDRows, spec: models.ModelSpec,
           distill: DistillParams, world: int, budget: int | None = None,
           held: np.ndarray | None = None) -> tuple[nn.Module, train.History, int, FitConfig]:
    """One training of a fresh student with `distill`; returns the model, its curve, the epochs a
    checkpoint restored and the loop it ran. `budget` (a search candidate): that many epochs over the
    student's rows, `held` held out and scored once at the end. Labels alone train as the baseline does:
    on the labelled rows, with as many steps, so a student chosen that way is the baseline's twin."""
    lead = distributed.writes()
    held = rows.val if held is None else held
    n = rows.extent(distill)
    model = task.build(spec, rows.x[:n], params.train.seed, task.init_dir(params, workdir))
    cfg = fit_config(params.train, len(rows.x) - len(held))
    if budget is not None:
        cfg = dataclasses.replace(cfg, epochs=min(budget, cfg.epochs))
    if search.labels_only(distill):  # the baseline's recipe: as many steps as the student, over the labelled rows
        cfg = labels_only_config(params.train, len(rows.x), n, len(held), budget and cfg.epochs)
        distill = distill.model_copy(update={"features": ()})  # no hints either: the baseline's twin
    if budget is not None:
        cfg = dataclasses.replace(cfg, patience=None, keep_best=False)
    inputs = {"params": params.model_dump(mode="json", include={"student", "train"}, exclude=WHERE),
              "distill": distill.model_dump(mode="json"), "epochs": cfg.epochs, "steps": cfg.steps,
              "patience": cfg.patience, "keep_best": cfg.keep_best, "held_out": [len(held), int(held.sum())],
              "cache": rows.keys}
    ckpt = checkpoint_path(workdir, params, "train_student", inputs, world)
    distributed.check_same(ckpt.stem, "the student's inputs (params, prepared data, teacher cache, training code)")
    resumed = train.checkpoint_epochs(ckpt)
    loss, soft = kd_objective(distill, rows)
    net, extra = _hinted(distill, rows.caches[0], model, task.example(spec, batch=2))
    name = search.label(distill.alpha, distill.temperature, distill.loss)
    what = "training student" if budget is None else f"trying {name}"
    history = fit(net, rows.x[:n], rows.y[:n], loss, cfg, soft=soft, val=held,
                  on_epoch=epoch_logger(workdir, "student") if lead and budget is None else None,
                  progress=progress.bar(what) if lead else None, checkpoint=ckpt, extra=extra,
                  lengths=rows.lengths[:n] if rows.lengths is not None else None)
    if isinstance(net, features.HintedStudent):
        net.release()  # hooks off; `model`, saved below, is the bare student: the projections stay behind
    return model, history, resumed, cfg


def _search(params: Params, workdir: Path, task: tasks.Task, rows: KDRows, spec: models.ModelSpec,
            world: int) -> tuple[DistillParams, list[search.Trial], search.Decision, str]:
    """Train every candidate setting on the same budget and score it on the same held-out rows (the
    validation rows, or k folds of the labelled rows when those are too few); each candidate's curve
    becomes a child run of the DAG run. Returns the setting kept, the trials, the decision and how
    the candidates were scored."""
    cfg = params.distill.search
    assert cfg is not None  # a search runs only when distill.search is set
    held_out = search.folds(rows.labelled, rows.val, rows.positions, cfg, params.train.seed)
    settings, trials, per_row = search.candidates(params.distill), [], []
    for d in settings:
        scores, seconds = [], 0.0
        for held in held_out:
            model, history, _, fcfg = _train(params, workdir, task, rows, spec, d, world, cfg.epochs, held)
            scores.append(_held_out_scores(task, model, rows, held))
            seconds += sum(h["seconds"] for h in history)
        trained = rows.extent(d) - len(held_out[0])
        acc, nll = search.pooled(scores)
        trials.append(search.Trial(d.alpha, d.temperature, d.loss, acc, nll, seconds,
                                   *train.budget(fcfg, trained), trained, len(held_out),
                                   sum(len(h) for h in held_out)))
        # per row, higher is better: right or wrong, or (a lower-is-better headline) minus the row's NLL
        per_row.append(np.concatenate([-n if task.lower_is_better else a for a, n in scores]))
        if distributed.writes():
            log_trial(workdir, trials[-1], history)
    decision = search.decide(trials, per_row, task.lower_is_better, cfg.max_p_value)
    return settings[decision.chosen], trials, decision, search.scored_by(held_out, rows.positions)


def _held_out_scores(task: tasks.Task, model: nn.Module, rows: KDRows,
                     held: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per held-out row: accuracy and mean NLL over its labelled positions.  # (V,), (V,)"""
    acc, nll = [], []
    step = max(1, SCORE_POSITIONS // rows.positions)
    for start in range(0, len(held), step):
        idx = held[start:start + step]  # (b,)
        z = torch.from_numpy(task.predict_logits(model, rows.x[idx])).float()  # (b·P, C)
        y = torch.from_numpy(rows.y[idx].reshape(-1)).long()  # (b·P,)
        mask = (y >= 0).reshape(len(idx), -1).float()  # (b, P)
        lp = torch.log_softmax(z, -1).gather(1, y.clamp(min=0)[:, None]).reshape(len(idx), -1)  # (b, P)
        right = (z.argmax(-1) == y).float().reshape(len(idx), -1)  # (b, P)
        count = mask.sum(1).clamp(min=1)
        acc.append(((right * mask).sum(1) / count).numpy())
        nll.append((-(lp * mask).sum(1) / count).numpy())
    return np.concatenate(acc), np.concatenate(nll)


def _distil(params: Params, workdir: Path, world: int) -> StudentResult:
    """One rank's training; one process alone (distributed.writes) logs, checkpoints and writes the outputs."""
    task = tasks.for_params(params)
    splits = data.read_prepared(workdir / params.paths.prepared)
    rows = kd_rows(params, workdir, task, splits)
    spec = task.spec(params.student, splits.schema, workdir)
    distill, how = params.distill, ""
    trials: list[search.Trial] = []
    decision: search.Decision | None = None
    if params.distill.search is not None:
        distill, trials, decision, how = _search(params, workdir, task, rows, spec, world)
    model, history, resumed, _ = _train(params, workdir, task, rows, spec, distill, world)
    if distributed.writes():
        with atomic_dir(workdir / params.paths.student) as out:
            task.save(model, spec, out)
            if decision is not None:
                assert params.distill.search is not None  # a decision comes from a search
                search.write(out / search.SEARCH_FILE, trials, decision, how, params.distill.search.epochs)
        write_curve(history, workdir / params.paths.metrics / CURVE)
        discard_checkpoints(workdir, params, "train_student")
    result = StudentResult.from_history("student", spec.arch, history, resumed, world)
    return dataclasses.replace(result, setting=trials[decision.chosen].label if decision else None)
