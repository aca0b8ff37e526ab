"""prepare: source tables -> data/prepared/{train,test,transfer}.parquet + schema.json."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from kd_core import tasks
from kd_core.config import Params
from kd_core.fs import atomic_dir


@dataclass(frozen=True)
class PrepareResult:
    train: int
    test: int
    transfer: int
    classes: int
    row: str  # what one row is (Task.describe)

    def summary(self) -> str:
        return (f"prepared {self.train} train / {self.test} test / {self.transfer} transfer rows, "
                f"{self.classes} classes; a row is {self.row}")


def _warn_untracked(params: Params, workdir: Path) -> None:
    """DVC only sees content changes of files under paths.raw; say so once for files elsewhere."""
    raw = (workdir / params.paths.raw).resolve()
    for key in ("train", "test", "transfer"):
        value = getattr(params.data, key)
        if value and raw not in (workdir / value).resolve().parents:
            print(f"kd: note: data.{key}={value} is outside {params.paths.raw}/, so `dvc repro` "
                  "notices a new path but not new content at the same path", file=sys.stderr)


def run(params: Params, workdir: Path) -> PrepareResult:
    if params.data.source == "parquet":
        _warn_untracked(params, workdir)
    task = tasks.for_params(params)
    with atomic_dir(workdir / params.paths.prepared) as out:
        splits = task.prepare(params, workdir, out)
    return PrepareResult(len(splits.train), len(splits.test), len(splits.transfer), len(splits.schema.classes),
                         task.describe(splits.schema))
