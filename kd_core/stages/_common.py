"""Helpers shared by the training stages: labelled arrays and live metric logging."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from kd_core import data
from kd_core.config import TrainParams
from kd_core.train import FitConfig


def labelled_arrays(splits: data.Splits) -> tuple[np.ndarray, np.ndarray]:
    """Training rows (N, F) and class indices (N,)."""
    return data.features_array(splits.train, splits.schema), data.label_indices(splits.train, splits.schema)


def fit_config(train: TrainParams) -> FitConfig:
    return FitConfig(train.epochs, train.batch_size, train.lr, train.weight_decay, train.seed, train.device)


def epoch_logger(workdir: Path, prefix: str) -> Callable[[dict[str, float]], None]:
    """Send each epoch's metrics to the DAG run's MLflow run (a no-op under plain `dvc repro`)."""
    from kd_core import registry

    def log(row: dict[str, float]) -> None:
        step = int(row["epoch"])
        registry.log_epoch_metrics(workdir, {f"{prefix}.{k}": v for k, v in row.items() if k != "epoch"}, step)

    return log


def write_curve(history: list[dict[str, float]], path: Path) -> None:
    """Per-epoch metrics as CSV for `dvc plots`."""
    from kd_core.stages import atomic_write_text

    keys = list(history[0]) if history else ["epoch"]
    lines = [",".join(keys)] + [",".join(f"{row.get(k, '')}" for k in keys) for row in history]
    atomic_write_text(path, "\n".join(lines) + "\n")
