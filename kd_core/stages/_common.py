"""Helpers shared by the training stages: labelled arrays, validation rows, checkpoints, logging."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

from kd_core import data
from kd_core.config import Params, TrainParams
from kd_core.train import FitConfig, History

CHECKPOINTS = "train"  # under params.paths.work: one folder per training stage
# kd_core files every training run executes
CODE = ("train.py", "losses.py", "models.py", "features.py", "stages/_common.py")


def labelled_arrays(splits: data.Splits) -> tuple[np.ndarray, np.ndarray]:
    """Training rows (N, F) and class indices (N,)."""
    return data.features_array(splits.train, splits.schema), data.label_indices(splits.train, splits.schema)


def fit_config(train: TrainParams) -> FitConfig:
    return FitConfig(train.epochs, train.batch_size, train.lr, train.weight_decay, train.seed, train.device,
                     train.compile, train.patience)


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
    `inputs` (params sections, data or cache key), the world size and the training code — so only a
    run that would compute exactly the same epochs resumes from it."""
    h = hashlib.sha256(json.dumps({"stage": stage, "world": world, **inputs}, sort_keys=True).encode())
    kd_core = Path(__file__).resolve().parents[1]
    for name in (*CODE, f"stages/{stage}.py"):
        h.update((kd_core / name).read_bytes())
    return workdir / params.paths.work / CHECKPOINTS / stage / f"{h.hexdigest()[:20]}.safetensors"


def discard_checkpoints(workdir: Path, params: Params, stage: str) -> None:
    """After the outputs are in place: this run's checkpoint and any stale ones of the stage."""
    shutil.rmtree(workdir / params.paths.work / CHECKPOINTS / stage, ignore_errors=True)


def epoch_logger(workdir: Path, prefix: str) -> Callable[[dict[str, float]], None]:
    """Send each epoch's metrics to the DAG run's MLflow run (a no-op under plain `dvc repro`)."""
    from kd_core import registry

    def log(row: dict[str, float]) -> None:
        step = int(row["epoch"])
        registry.log_epoch_metrics(workdir, {f"{prefix}.{k}": v for k, v in row.items() if k != "epoch"}, step)

    return log


def write_curve(history: History, path: Path) -> None:
    """Per-epoch metrics as CSV for `dvc plots`."""
    from kd_core.stages import atomic_write_text

    keys = list(history[0]) if history else ["epoch"]
    lines = [",".join(keys)] + [",".join(f"{row.get(k, '')}" for k in keys) for row in history]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_curve(path: Path) -> History:
    """The rows `write_curve` wrote."""
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]
