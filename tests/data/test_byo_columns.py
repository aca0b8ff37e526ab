"""Bring-your-own tables: with features = "every column but the label", train and test must agree both ways."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kd_core import data
from kd_core.config import DataParams
from kd_core.errors import UserError


def _table(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(rng.normal(size=(n, 4)), columns=["a", "b", "c", "d"])
    df["label"] = rng.choice(["x", "y"], n)
    return df


def _splits(tmp_path: Path, train: pd.DataFrame, test: pd.DataFrame, **kw) -> data.Splits:
    train.to_parquet(tmp_path / "train.parquet")
    test.to_parquet(tmp_path / "test.parquet")
    params = DataParams(source="parquet", train="train.parquet", test="test.parquet", **kw)
    return data.parquet_splits(params, tmp_path)


def test_training_table_lacking_a_test_column_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"test.parquet: column\(s\) \['d'\].*not in the training table"):
        _splits(tmp_path, _table(50, 0).drop(columns=["d"]), _table(20, 1))


def test_test_table_lacking_a_training_column_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"test.parquet: missing column\(s\) \['c'\]"):
        _splits(tmp_path, _table(50, 0), _table(20, 1).drop(columns=["c"]))


def test_explicit_feature_columns_may_leave_extra_columns_out(tmp_path: Path) -> None:
    splits = _splits(tmp_path, _table(50, 0).drop(columns=["d"]), _table(20, 1), feature_columns=("a", "b"))
    assert splits.schema.features == ("a", "b") and list(splits.test.columns) == ["a", "b", "label"]


def test_same_columns_in_another_order_pass(tmp_path: Path) -> None:
    test = _table(20, 1)
    splits = _splits(tmp_path, _table(50, 0), test[["label", "d", "c", "b", "a"]])
    assert splits.schema.features == ("a", "b", "c", "d")
