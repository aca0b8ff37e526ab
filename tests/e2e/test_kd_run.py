"""`kd run`: the whole Prefect flow (real ephemeral Prefect API, DVC, GX, MLflow) on a tiny config."""

import json

import mlflow
import pytest
from mlflow import MlflowClient

from tests.conftest import kd

pytestmark = pytest.mark.slow


def test_kd_run_registers_a_student(project, own_dvc_cache):
    """From scratch: a cache of its own, so every stage computes and logs its live curves."""
    res = kd(project, "run")
    assert res.returncode == 0, res.stdout + res.stderr
    for role in ("teacher", "baseline", "student"):
        assert role in res.stdout
    assert "promotion:" in res.stdout

    reg = json.loads((project / "metrics/register.json").read_text())
    assert set(reg) >= {"decision", "reasons", "model_name", "version", "aliases"}
    client = MlflowClient()
    version = client.get_model_version(reg["model_name"], str(reg["version"]))
    assert version.tags["decision"] == reg["decision"]
    assert "challenger" in reg["aliases"]

    # one MLflow run per DAG run, holding the per-epoch training curves
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "train.student.loss")) == 3
    assert len(client.get_metric_history(run.info.run_id, "train.teacher.loss")) == 8
    # live curves and test metrics never share a name: `student.accuracy` is the test accuracy alone
    evals = json.loads((project / "metrics/eval.json").read_text())
    history = client.get_metric_history(run.info.run_id, "student.accuracy")
    assert [m.value for m in history] == [evals["student"]["accuracy"]]
    assert len(client.get_metric_history(run.info.run_id, "train.student.accuracy")) == 3

    # the registered model serves raw rows with class predictions
    import pandas as pd

    test = pd.read_parquet(project / "data/prepared/test.parquet")
    model = mlflow.pyfunc.load_model(f"models:/{reg['model_name']}/{reg['version']}")
    preds = model.predict(test.drop(columns=["label"]).iloc[:, ::-1].head(5))
    assert set(map(int, list(preds))) <= set(range(10))

    again = kd(project, "run")
    assert again.returncode == 0, again.stderr
    assert "up to date" in again.stdout
    assert len(client.search_model_versions(f"name='{reg['model_name']}'")) == 1
