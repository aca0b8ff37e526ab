"""Bring-your-own parquet tables of another width, with string or sparse integer labels, end to end."""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest

from tests.conftest import dvc, git, kd, write_params

pytestmark = pytest.mark.slow


def make_tables(labels: list, width: int) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(0)
    centers = {c: rng.normal(scale=3.0, size=width) for c in labels}

    def draw(n: int, seed: int) -> pd.DataFrame:
        r = np.random.default_rng(seed)
        y = r.choice(len(labels), n)
        x = r.normal(size=(n, width)) + np.stack([centers[labels[i]] for i in y])
        df = pd.DataFrame(x, columns=[f"col_{i}" for i in range(width)])
        df.insert(2, "target", [labels[i] for i in y])  # the label need not be the last column
        return df

    return draw(400, 1), draw(150, 2), draw(600, 3).drop(columns=["target"])


def use(project, train, test, transfer):
    train.to_parquet(project / "data/raw/train.parquet")
    test.to_parquet(project / "data/raw/test.parquet")
    transfer.to_parquet(project / "data/raw/unlabelled.parquet")
    write_params(project, {"data": {"source": "parquet", "train": "data/raw/train.parquet",
                                    "test": "data/raw/test.parquet", "transfer": "data/raw/unlabelled.parquet",
                                    "label_column": "target"}})
    git(project, "add", "-A")
    git(project, "commit", "-qm", "byo data")


def test_string_labels_through_kd_run(project):
    labels = ["setosa", "versicolor", "virginica", "zebra"]
    train, test, transfer = make_tables(labels, 7)
    use(project, train, test, transfer)
    res = kd(project, "run")
    assert res.returncode == 0, res.stdout + res.stderr
    ev = json.loads((project / "metrics/eval.json").read_text())
    assert ev["student"]["accuracy"] > 0.9
    schema = json.loads((project / "data/prepared/schema.json").read_text())
    assert schema["classes"] == labels and "target" not in schema["features"]
    manifest = json.loads((project / "artifacts/logits/manifest.json").read_text())
    assert manifest["rows"] == 400 + 600 and manifest["classes"] == 4

    reg = json.loads((project / "metrics/register.json").read_text())
    model = mlflow.pyfunc.load_model(f"models:/{reg['model_name']}/{reg['version']}")
    preds = list(model.predict(test.drop(columns=["target"]).sample(frac=1.0, axis=1, random_state=0)))
    assert set(preds) <= set(labels)
    assert np.mean(np.array(preds) == test["target"].to_numpy()) > 0.9


def test_sparse_integer_labels_and_feature_subset_with_dvc(project):
    labels = [3, 7, 42]
    train, test, transfer = make_tables(labels, 5)
    use(project, train, test, transfer)
    write_params(project, {"data": {"feature_columns": ["col_4", "col_0", "col_2"]}})
    res = dvc(project, "repro")
    assert res.returncode == 0, res.stdout + res.stderr
    schema = json.loads((project / "data/prepared/schema.json").read_text())
    assert schema["features"] == ["col_4", "col_0", "col_2"] and schema["classes"] == labels
    ev = json.loads((project / "metrics/eval.json").read_text())
    assert ev["teacher"]["accuracy"] > 0.8 and set(ev["student"]["per_class_accuracy"]) == {"3", "7", "42"}
