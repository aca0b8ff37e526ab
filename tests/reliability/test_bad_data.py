"""Bad bring-your-own data stops the DAG before compute: exit != 0, one readable line, no model."""

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from tests.conftest import git, kd, write_params

pytestmark = pytest.mark.slow


def table(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    y = rng.choice(["cat", "dog", "eel"], n)
    centers = {"cat": 0.0, "dog": 2.0, "eel": -2.0}
    x = rng.normal(size=(n, 6)) + np.array([centers[v] for v in y])[:, None]
    df = pd.DataFrame(x, columns=[f"f{i}" for i in range(6)])
    df["species"] = y
    return df


def use_tables(project, train: pd.DataFrame, test: pd.DataFrame) -> None:
    train.to_parquet(project / "data/raw/train.parquet")
    test.to_parquet(project / "data/raw/test.parquet")
    write_params(project, {"data": {"source": "parquet", "train": "data/raw/train.parquet",
                                    "test": "data/raw/test.parquet", "label_column": "species"}})
    git(project, "add", "-A")
    git(project, "commit", "-qm", "byo data")


def corrupt_nulls(train, test):
    train.loc[[3, 8], "f2"] = np.nan
    return train, test


def corrupt_unknown_label(train, test):
    test.loc[[1, 2, 5], "species"] = "zebra"
    return train, test


@pytest.mark.parametrize("corrupt,needles", [
    (corrupt_nulls, ["train.parquet", "f2", "2"]),
    (corrupt_unknown_label, ["test.parquet", "species", "3", "zebra"]),
])
def test_validation_rejects_corrupt_table(project, corrupt, needles):
    train, test = corrupt(table(300, 0), table(100, 1))
    use_tables(project, train, test)
    res = kd(project, "run")
    assert res.returncode != 0
    assert "Traceback" not in res.stderr
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("kd: error:")]
    assert len(errors) == 1, res.stderr
    assert "validate" in errors[0]
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert not (project / "artifacts/teacher").exists()  # stopped before any compute
    client = MlflowClient()
    assert client.search_model_versions("name='kd-student'") == []
