"""GX suites on small local frames: clean data passes; each kind of bad data fails with a line that
names the split's file, the column and how many rows are bad."""

from __future__ import annotations

import json
from pathlib import Path

import great_expectations.expectations as gxe
import numpy as np
import pandas as pd
import pytest
from great_expectations.core import ExpectationValidationResult

from kd_core import data
from kd_core.config import ValidationParams, parse_params
from kd_core.errors import UserError
from kd_core.stages import validate as validate_stage
from kd_core.validation import describe_failure, validate_splits

FEATURES = ("f1", "f2", "f3")
SOURCES = {"train": "data.train (raw/train.parquet)", "test": "data.test (raw/test.parquet)",
           "transfer": "data.transfer (raw/transfer.parquet)"}
PARAMS = ValidationParams(min_rows_per_class=5, max_duplicate_frac=0.05)


def _frame(labels: list | None, n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({c: rng.standard_normal(n) for c in FEATURES})
    if labels is not None:
        df["label"] = labels
    return df


def clean() -> dict[str, pd.DataFrame]:
    """18 training rows over 3 string classes (6 each), 6 test rows, 10 unlabelled transfer rows."""
    return {"train": _frame(["a", "b", "c"] * 6, 18, 0), "test": _frame(["a", "b", "c"] * 2, 6, 1),
            "transfer": _frame(None, 10, 2)}


def splits(frames: dict[str, pd.DataFrame]) -> data.Splits:
    classes = tuple(sorted(frames["train"]["label"].dropna().unique().tolist()))
    return data.Splits(frames["train"], frames["test"], frames["transfer"],
                       data.Schema(FEATURES, "label", classes))


def strict_json(path: Path) -> dict:
    """Parse as strict JSON: NaN and Infinity, which GX results can quote, must not leak into reports."""
    def reject(constant: str) -> None:
        raise AssertionError(f"{path.name} holds non-JSON {constant}")

    return json.loads(path.read_text(), parse_constant=reject)


def check(frames: dict[str, pd.DataFrame], out: Path, params: ValidationParams = PARAMS) -> tuple[str, ...]:
    return validate_splits(splits(frames), params, out, SOURCES).failures


def test_clean_splits_pass_and_write_strict_json_reports(tmp_path: Path) -> None:
    report = validate_splits(splits(clean()), PARAMS, tmp_path, SOURCES)
    assert report.success and report.failures == ()
    for name in ("train", "test", "transfer", "train_class_counts"):
        assert strict_json(tmp_path / f"{name}.json")["success"] is True
    summary = strict_json(tmp_path / "summary.json")
    assert summary["success"] is True and summary["failures"] == []
    assert summary["splits"]["train"]["rows"] == 18
    assert summary["splits"]["train"]["rows_per_class"] == {"a": 6, "b": 6, "c": 6}


def test_null_feature_is_counted(tmp_path: Path) -> None:
    frames = clean()
    frames["train"].loc[[2, 5], "f2"] = np.nan
    assert check(frames, tmp_path) == ("data.train (raw/train.parquet): column 'f2' has 2 null value(s)",)


def test_null_label_is_counted(tmp_path: Path) -> None:
    frames = clean()
    frames["train"].loc[0, "label"] = None
    assert check(frames, tmp_path) == ("data.train (raw/train.parquet): column 'label' has 1 null value(s)",)


def test_infinite_features_are_counted_and_reports_stay_strict_json(tmp_path: Path) -> None:
    frames = clean()
    frames["test"].loc[0, "f1"] = np.inf
    frames["test"].loc[3, "f1"] = -np.inf
    failures = check(frames, tmp_path)
    assert len(failures) == 1
    assert failures[0].startswith("data.test (raw/test.parquet): column 'f1' has 2 infinite value(s)")
    assert strict_json(tmp_path / "test.json")["success"] is False


def test_test_labels_outside_training_classes(tmp_path: Path) -> None:
    frames = clean()
    frames["test"].loc[[1, 4, 5], "label"] = "zebra"
    assert check(frames, tmp_path) == ("data.test (raw/test.parquet): column 'label' has 3 value(s) "
                                       "outside the training classes (e.g. 'zebra')",)


def test_too_few_rows_for_one_class(tmp_path: Path) -> None:
    frames = clean()
    labels = [7] * 6 + [8] * 6 + [9] * 2
    frames["train"] = _frame(labels, len(labels), 3)
    frames["test"]["label"] = [7, 8, 9, 7, 8, 9]
    assert check(frames, tmp_path) == ("data.train (raw/train.parquet): class 9 has 2 rows, fewer than "
                                       "validation.min_rows_per_class=5",)


def test_too_few_rows_for_several_classes(tmp_path: Path) -> None:
    failures = check(clean(), tmp_path, ValidationParams(min_rows_per_class=10))
    assert failures == ("data.train (raw/train.parquet): 3 classes have fewer rows than "
                        "validation.min_rows_per_class=10 (class 'a': 6, class 'b': 6, class 'c': 6)",)


def test_duplicates_above_threshold_fail_and_below_pass(tmp_path: Path) -> None:
    frames = clean()
    frames["transfer"] = pd.concat([frames["transfer"], frames["transfer"].iloc[:2]], ignore_index=True)
    assert check(frames, tmp_path) == (
        "data.transfer (raw/transfer.parquet): 4 of 12 rows (33.3%) repeat another row's features, "
        "more than validation.max_duplicate_frac=0.05",)
    assert check(frames, tmp_path, ValidationParams(max_duplicate_frac=0.5)) == ()


def test_test_columns_must_match_train(tmp_path: Path) -> None:
    frames = clean()
    frames["test"] = frames["test"].drop(columns="f3").assign(extra=1.0)
    failures = check(frames, tmp_path)
    assert failures == ("data.test (raw/test.parquet): columns do not match the train split's columns: "
                        "missing ['f3']; unexpected ['extra']",)


def test_non_numeric_feature_is_named(tmp_path: Path) -> None:
    frames = clean()
    frames["test"]["f2"] = frames["test"]["f2"].astype(str)
    failures = check(frames, tmp_path)
    assert len(failures) == 1  # the dtype's name differs between pandas 2 (object) and 3 (str)
    assert failures[0].startswith("data.test (raw/test.parquet): column 'f2' is not numeric (dtype ")


def test_single_class_fails(tmp_path: Path) -> None:
    frames = clean()
    frames["train"]["label"] = "a"
    frames["test"]["label"] = "a"
    assert check(frames, tmp_path) == ("data.train (raw/train.parquet): column 'label' has 1 distinct "
                                       "class(es); training a classifier needs at least 2",)


def test_empty_transfer_passes(tmp_path: Path) -> None:
    frames = clean()
    frames["transfer"] = frames["transfer"].iloc[:0]
    assert check(frames, tmp_path) == ()


def test_an_expectation_that_crashed_is_reported_not_hidden() -> None:
    crashed = ExpectationValidationResult(
        success=False, expectation_config=gxe.ExpectColumnValuesToNotBeNull(column="f1").configuration,
        exception_info={"metric": {"raised_exception": True, "exception_message": "boom"}})
    assert describe_failure(crashed, SOURCES["train"], PARAMS) == (
        "data.train (raw/train.parquet): expect_column_values_to_not_be_null on column 'f1' could not run: boom")


def _prepare(tmp_path: Path, frames: dict[str, pd.DataFrame]):
    params = parse_params({"data": {"source": "parquet", "train": "raw/train.parquet",
                                    "test": "raw/test.parquet"}})
    data.write_prepared(splits(frames), tmp_path / params.paths.prepared)
    return params


def test_stage_passes_and_summarises(tmp_path: Path) -> None:
    params = _prepare(tmp_path, clean())
    result = validate_stage.run(params, tmp_path)
    assert result.summary().endswith("18 train, 6 test, 10 transfer rows")
    assert json.loads((tmp_path / "reports/validation/summary.json").read_text())["success"] is True


def test_stage_failure_is_one_line_and_keeps_the_reports(tmp_path: Path) -> None:
    frames = clean()
    frames["train"].loc[0, "f1"] = np.nan
    frames["test"].loc[0, "label"] = "zebra"
    params = _prepare(tmp_path, frames)
    with pytest.raises(UserError) as err:
        validate_stage.run(params, tmp_path)
    assert str(err.value) == ("validation failed: data.train (raw/train.parquet): column 'f1' has 1 null "
                              "value(s) (+1 more; see reports/validation/summary.json)")
    summary = json.loads((tmp_path / "reports/validation/summary.json").read_text())
    assert summary["success"] is False and len(summary["failures"]) == 2
