"""validate: Great Expectations suites on the prepared splits -> reports/validation/; stops the DAG on failure."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from kd_core import data
from kd_core.config import DataParams, Params
from kd_core.errors import UserError
from kd_core.fs import atomic_dir
from kd_core.lm_data import DOCUMENTS
from kd_core.text_data import TOKENS
from kd_core.validation import SUMMARY_FILE, validate_splits


@dataclass(frozen=True)
class ValidateResult:
    train: int
    test: int
    transfer: int
    expectations: int

    def summary(self) -> str:
        return (f"validated 3 splits with {self.expectations} expectations: {self.train} train, "
                f"{self.test} test, {self.transfer} transfer rows")


def sources(params: DataParams) -> dict[str, str]:
    """Name each split by what the user can fix: their own file, not the prepared copy."""
    if params.source in ("mnist1d", "fortunes", "stdlib"):  # built in: name the split of the source
        return {name: f"{params.source} {name}" for name in data.SPLITS}
    return {name: f"data.{name} ({getattr(params, name) or 'not set: no transfer rows'})"
            for name in data.SPLITS}


def _documents(params: Params, workdir: Path) -> pd.DataFrame | None:
    """`lm`: every document with its split and token count, as prepare wrote them; else None."""
    path = workdir / params.paths.prepared / DOCUMENTS
    if params.task != "lm" or not path.is_file():
        return None
    return pd.read_parquet(path).rename(columns={"tokens": TOKENS})


def run(params: Params, workdir: Path) -> ValidateResult:
    splits = data.read_prepared(workdir / params.paths.prepared)
    with atomic_dir(workdir / params.paths.validation) as out:  # reports are the evidence, pass or fail
        report = validate_splits(splits, params.validation, out, sources(params.data), _documents(params, workdir))
    if not report.success:
        more = f"+{len(report.failures) - 1} more; " if len(report.failures) > 1 else ""
        raise UserError(f"validation failed: {report.failures[0]} "
                        f"({more}see {Path(params.paths.validation) / SUMMARY_FILE})")
    return ValidateResult(len(splits.train), len(splits.test), len(splits.transfer),
                          sum(s["expectations"] for s in report.statistics.values()))
