"""Per-epoch training curves as CSV (`metrics/train_<role>.csv`): written by the training stages for
`dvc plots`, read back by a relaunched DDP parent and by the model card."""

from __future__ import annotations

import csv
from pathlib import Path

from kd_core.fs import atomic_write_text

History = list[dict[str, float]]  # one row per epoch: epoch, loss, accuracy, val_accuracy, ...


def write_curve(history: History, path: Path) -> None:
    keys = list(history[0]) if history else ["epoch"]
    lines = [",".join(keys)] + [",".join(f"{row.get(k, '')}" for k in keys) for row in history]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_curve(path: Path) -> History:
    """The rows `write_curve` wrote; no file is no epochs (a card for a run without that stage)."""
    if not path.exists():
        return []
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]
