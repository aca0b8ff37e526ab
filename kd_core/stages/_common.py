"""Helpers shared by the training stages: labelled arrays, validation rows, checkpoints, logging, results.

Stages never import each other; what two of them share lives here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from kd_core import data, tasks, train
from kd_core.config import Params, TrainParams
from kd_core.train import FitConfig, History

if TYPE_CHECKING:
    from kd_core.search import Trial

CHECKPOINTS = "train"  # under params.paths.work: one folder per training stage
# kd_core files every training run executes
CODE = ("train.py", "losses.py", "models.py", "features.py", "stages/_common.py", "tasks/base.py", "tasks/_hf.py")
RUN_ID_ENV = "MLFLOW_RUN_ID"  # kd_core.tracking.RUN_ID_ENV, read here without importing mlflow
LIVE_PREFIX = "train"  # live curves are `train.<role>.<metric>`, apart from the test metrics `<role>.<metric>`


def labelled_arrays(task: tasks.Task, splits: data.Splits) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs of the labelled training rows (N, ...) and their class indices (N,)."""
    return task.inputs(splits.train, splits.schema), task.labels(splits.train, splits.schema)


# where a training runs, not what it computes: the same job on every machine, whatever its node rank
# or meeting point, so neither enters a checkpoint key nor the rendezvous id
WHERE = {"train": {"node_rank", "rdzv_endpoint"}}

def per_row(loss: train.LossFn, positions: int) -> train.LossFn:
    """A per-position loss as the per-row loss the loop reduces: rows of P positions (`lm`: tokens of a
    sequence) score the mean over their positions.  # (b, P, C), targets (b·P, …), (b, P) -> (b,)"""
    if positions == 1:
        return loss

    def mean_over_positions(out: torch.Tensor, t: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        return loss(out.reshape(-1, out.shape[-1]), t, y.reshape(-1)).reshape(y.shape).mean(dim=-1)
    return mean_over_positions


def position_targets(soft: train.SoftLabels, positions: int) -> train.SoftLabels:
    """Soft labels of whole rows: row i's cache rows are i·P … i·P + P - 1 (kd_core.tasks.base.positions)."""
    if positions == 1:
        return soft
    return lambda idx: soft((np.asarray(idx)[:, None] * positions + np.arange(positions)).reshape(-1))


@dataclass(frozen=True)
class StudentResult:
    """What a student or baseline training stage reports."""

    name: str
    arch: str
    epochs: int
    best_epoch: int
    val_accuracy: float | None  # of the kept epoch; None without a validation split
    final_loss: float
    seconds: float
    processes: int
    resumed_from: int | None  # epochs restored from a checkpoint; None: not known (the relaunching parent)
    setting: str | None = None  # the distillation setting distill.search chose, if it ran

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
        chosen = f"; {self.setting} chosen on the validation rows" if self.setting else ""
        return (f"{self.name} {self.arch}: {self.epochs} epochs{resumed}{procs} in {self.seconds:.1f} s, "
                f"final loss {self.final_loss:.4f}{kept}{chosen}")


def epochs_for(epochs: int, min_steps: int | None, rows: int, batch_size: int) -> int:
    """`epochs`, raised so that `rows` per epoch in batches of `batch_size` make at least `min_steps`
    optimizer steps: a recipe tuned on a few thousand rows still trains on a few hundred."""
    if min_steps is None:
        return epochs
    return max(epochs, -(-min_steps // max(1, -(-rows // batch_size))))


def fit_config(train: TrainParams, rows: int) -> FitConfig:
    """The student's loop settings for `rows` trained on per epoch (train.min_steps may add epochs)."""
    return FitConfig(epochs_for(train.epochs, train.min_steps, rows, train.batch_size), train.batch_size, train.lr,
                     train.weight_decay, train.seed, train.device, train.compile, train.patience)


def labels_only_config(train: TrainParams, all_rows: int, labelled: int, n_val: int,
                       epochs: int | None = None) -> FitConfig:
    """The loop of a network trained on the labelled rows alone (the baseline, or distill.search's
    `alpha: 0`): exactly as many optimizer steps as the student gets over all `all_rows` rows in
    `epochs` (default: the student's), with a patience of as many steps, so a comparison is about
    the labels and not the training budget."""
    student_rows = all_rows - n_val
    ratio = student_rows / max(labelled - n_val, 1)
    base = epochs if epochs is not None else fit_config(train, student_rows).epochs
    steps = -(-student_rows // train.batch_size) * base
    scaled = {"epochs": max(1, round(base * ratio)), "min_steps": None}
    if train.patience is not None:
        scaled["patience"] = max(1, round(train.patience * ratio))
    return dataclasses.replace(fit_config(train.model_copy(update=scaled), labelled - n_val), steps=steps)


def validation_rows(n_labelled: int, fraction: float, seed: int) -> np.ndarray:
    """Labelled row numbers held out for early stopping: a seeded random `fraction` of 0..n-1.  # (V,)

    Student and baseline call it with the same arguments, so both are scored on the same rows,
    and neither trains on them.
    """
    n_val = round(n_labelled * fraction)
    return np.sort(np.random.default_rng(seed).permutation(n_labelled)[:n_val])


def checkpoint_path(workdir: Path, params: Params, stage: str, inputs: dict, world: int) -> Path:
    """Where `stage` keeps its training checkpoint: the ignored work directory, not the stage output
    (DVC deletes outputs before re-running a stage), under a key of everything the run depends on —
    `inputs` (params sections, data or cache key), the world size and the training code (the selected
    task's whole package among it) — so only a run that would compute exactly the same epochs resumes."""
    h = hashlib.sha256(json.dumps({"stage": stage, "world": world, **inputs}, sort_keys=True).encode())
    kd_core = Path(__file__).resolve().parents[1]
    task_code = sorted(p.relative_to(kd_core).as_posix() for p in (kd_core / "tasks" / params.task).rglob("*.py"))
    for name in (*CODE, *task_code, f"stages/{stage}.py"):
        h.update(name.encode())
        h.update((kd_core / name).read_bytes())
    return workdir / params.paths.work / CHECKPOINTS / stage / f"{h.hexdigest()[:20]}.safetensors"


def discard_checkpoints(workdir: Path, params: Params, stage: str) -> None:
    """After the outputs are in place: this run's checkpoint and any stale ones of the stage."""
    shutil.rmtree(workdir / params.paths.work / CHECKPOINTS / stage, ignore_errors=True)


def log_trial(workdir: Path, trial: Trial, history: History) -> None:
    """A `distill.search` candidate as a child run of the DAG run: its setting, curve and score
    (a no-op under plain `dvc repro`)."""
    if not os.environ.get(RUN_ID_ENV):
        return
    from dataclasses import asdict

    from kd_core import tracking

    tracking.log_child_run(workdir, f"search: {trial.label}", asdict(trial), history)


def epoch_logger(workdir: Path, prefix: str) -> Callable[[dict[str, float]], None]:
    """Send each epoch's metrics to the DAG run's MLflow run (a no-op under plain `dvc repro`).

    Namespaced `train.<prefix>.<metric>`: the run also holds the test metrics `<prefix>.<metric>`
    from eval.json, and one name for both would show whichever was logged last.
    """
    if not os.environ.get(RUN_ID_ENV):  # plain `dvc repro`: no DAG run, and no MLflow import for nothing
        return lambda _row: None
    from kd_core import tracking

    def log(row: dict[str, float]) -> None:
        step = int(row["epoch"])
        live = {f"{LIVE_PREFIX}.{prefix}.{k}": v for k, v in row.items() if k != "epoch"}
        tracking.log_epoch_metrics(workdir, live, step)

    return log

