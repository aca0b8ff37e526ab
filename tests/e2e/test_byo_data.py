"""Bring-your-own parquet tables of another width, with string or sparse integer labels, end to end:
the string-labelled table goes through `kd run` (the whole Prefect flow: real ephemeral Prefect API, DVC,
GX, MLflow) from scratch, the other through `dvc repro`."""

import json

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from kd_core.curves import read_curve
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


def test_string_labels_through_kd_run(project, own_dvc_cache):
    """From scratch: a DVC cache of its own, so every stage computes and logs its live curves."""
    labels = ["setosa", "versicolor", "virginica", "zebra"]
    train, test, transfer = make_tables(labels, 7)
    use(project, train, test, transfer)
    res = kd(project, "run")
    assert res.returncode == 0, res.stdout + res.stderr
    for role in ("teacher", "baseline", "student"):
        assert role in res.stdout
    assert "promotion:" in res.stdout
    ev = json.loads((project / "metrics/eval.json").read_text())
    assert ev["student"]["accuracy"] > 0.9
    schema = json.loads((project / "data/prepared/schema.json").read_text())
    assert schema["classes"] == labels and "target" not in schema["features"]
    manifest = json.loads((project / "artifacts/logits/manifest.json").read_text())
    assert manifest["rows"] == 400 + 600 and manifest["classes"] == 4

    reg = json.loads((project / "metrics/register.json").read_text())
    assert set(reg) >= {"decision", "reasons", "model_name", "version", "aliases"}
    client = MlflowClient()
    version = client.get_model_version(reg["model_name"], str(reg["version"]))
    assert version.tags["decision"] == reg["decision"] and "challenger" in reg["aliases"]

    # one MLflow run per DAG run, holding the per-epoch training curves the stages wrote
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    curve = read_curve(project / "metrics/train_student.csv")
    assert len(client.get_metric_history(run.info.run_id, "train.student.loss")) == len(curve) >= 3
    assert len(client.get_metric_history(run.info.run_id, "train.student.accuracy")) == len(curve)
    assert len(client.get_metric_history(run.info.run_id, "train.teacher.loss")) >= 8
    # live curves and test metrics never share a name: `student.accuracy` is the test accuracy alone
    history = client.get_metric_history(run.info.run_id, "student.accuracy")
    assert [m.value for m in history] == [ev["student"]["accuracy"]]

    # the registered model serves raw rows (columns in another order) with the table's own labels
    model = mlflow.pyfunc.load_model(f"models:/{reg['model_name']}/{reg['version']}")
    preds = list(model.predict(test.drop(columns=["target"]).sample(frac=1.0, axis=1, random_state=0)))
    assert set(preds) <= set(labels)
    assert np.mean(np.array(preds) == test["target"].to_numpy()) > 0.9

    again = kd(project, "run")
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stdout
    assert len(client.search_model_versions(f"name='{reg['model_name']}'")) == 1


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
