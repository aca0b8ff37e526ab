"""validate: Great Expectations suites on the prepared splits -> reports/validation/; stops the DAG on failure."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kd_core import data, tasks
from kd_core.config import Params
from kd_core.errors import UserError
from kd_core.fs import atomic_dir
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


def sources(params: Params) -> dict[str, str]:
    """Name each split by what the user can fix: their own file, not the prepared copy."""
    d = params.data
    if d.source in tasks.for_params(params).builtin_sources:  # built in: name the split of the source
        return {name: f"{d.source} {name}" for name in data.SPLITS}
    return {name: f"data.{name} ({getattr(d, name) or 'not set: no transfer rows'})" for name in data.SPLITS}


def run(params: Params, workdir: Path) -> ValidateResult:
    prepared, task = workdir / params.paths.prepared, tasks.for_params(params)
    splits = data.read_prepared(prepared)
    with atomic_dir(workdir / params.paths.validation) as out:  # reports are the evidence, pass or fail
        report = validate_splits(splits, params.validation, out, sources(params),
                                 lambda name: task.split_expectations(name, splits, params.validation),
                                 task.extra_suites(prepared, splits, params.validation))
    if not report.success:
        more = f"+{len(report.failures) - 1} more; " if len(report.failures) > 1 else ""
        raise UserError(f"validation failed: {report.failures[0]} "
                        f"({more}see {Path(params.paths.validation) / SUMMARY_FILE})")
    return ValidateResult(len(splits.train), len(splits.test), len(splits.transfer),
                          sum(s["expectations"] for s in report.statistics.values()))
