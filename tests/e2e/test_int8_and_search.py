"""distill.search and the int8 edge model through `kd run`: candidates as MLflow child runs, the setting on
the version and in the card; the int8 file checked against PyTorch on the test set; an int8 file the
policy rejects is a recorded decision: not shipped, the DAG goes on, the registered version stays as it was."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from kd_core import data, export, models
from tests.conftest import dvc, kd, write_params

pytestmark = pytest.mark.slow
SEARCH = {"distill": {"search": {"epochs": 2, "candidates": [{"alpha": 0.5, "temperature": 4.0}]}},
          "export": {"methods": ["minmax", "percentile"]}}


def test_search_then_int8_checked_then_a_rejected_int8_is_a_recorded_decision(project: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    write_params(project, SEARCH)
    res = kd(project, "run")
    assert res.returncode == 0, res.stderr[-3000:]
    reg = json.loads((project / "metrics/register.json").read_text())
    client = MlflowClient()
    version = client.get_model_version(reg["model_name"], str(reg["version"]))

    # the search: three settings tried (configured, labels only, the candidate), each a child run
    record = json.loads((project / "artifacts/student/search.json").read_text())
    assert [t["label"] for t in record["trials"]] == ["alpha 0.9, T 2, hinton", "alpha 0 (labels only)",
                                                      "alpha 0.5, T 4, hinton"]
    won = record["trials"][record["chosen_index"]]
    best = max(t["val_accuracy"] for t in record["trials"])
    kept = record["chosen_index"] == 0 and (record["p_value_vs_configured"] or 0) > 0.05
    assert won["val_accuracy"] >= best - 1e-12 or kept, record  # the best, unless not significantly better
    assert record["scored_by"] == "the 400 validation rows"
    steps = {t["label"]: t["steps"] for t in record["trials"]}  # the same budget for every candidate
    assert len(set(steps.values())) == 1, steps
    children = client.search_runs([client.get_run(version.run_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{version.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(f"search: {t['label']}" for t in record["trials"])
    curves = {r.info.run_name: len(client.get_metric_history(r.info.run_id, "val_accuracy")) for r in children}
    assert curves.pop("search: alpha 0 (labels only)") > 2  # as many steps over the labelled rows alone
    assert set(curves.values()) == {2}  # one point per epoch of each teacher-based candidate
    assert version.tags["distill.setting"] == won["label"]
    assert "3 settings on the same budget" in version.tags["distill.search"]
    assert "chosen by `distill.search`" in (project / "reports/model_card.md").read_text()

    # the int8 file, checked here against PyTorch on the test set: what export.json and the tags say
    report = json.loads((project / "metrics/export.json").read_text())
    splits = data.read_prepared(project / "data/prepared")
    x, y = data.features_array(splits.test, splits.schema), data.label_indices(splits.test, splits.schema)
    student, _ = models.load(project / "artifacts/student")
    ref = models.predict_logits(student, x)
    q = export._run_onnx(export.session(project / "artifacts/onnx" / export.INT8_FILE, 1), x)
    int8 = report["student"]["onnx_int8"]
    assert int8["accuracy"] == pytest.approx(float((q.argmax(1) == y).mean()))
    assert int8["agreement_with_pytorch"] == pytest.approx(float((q.argmax(1) == ref.argmax(1)).mean()))
    assert int8["max_abs_logit_diff"] == pytest.approx(float(np.abs(q - ref).max()), rel=1e-4)
    assert int8["agreement_with_pytorch"] >= 0.9 and int8["size_bytes"] < report["student"]["onnx"]["size_bytes"] / 2
    assert {c["method"] for c in report["int8"]["candidates"]} >= {"minmax", "percentile"}
    assert report["int8_policy"]["decision"] == "accepted"
    tags = client.get_model_version(reg["model_name"], str(reg["version"])).tags
    assert tags["int8.decision"] == "accepted" and float(tags["onnx_int8.size_bytes"]) == int8["size_bytes"]

    # a rule the int8 file cannot meet: a recorded decision, not a crash. Export exits 0 and ships the fp32
    # ONNX only; export.json, the version's tags and the card say why; the version and its aliases stay
    aliases = sorted(client.get_model_version(reg["model_name"], str(reg["version"])).aliases)
    write_params(project, {"policy": {"max_int8_size_bytes": 1000}})
    res = kd(project, "stage", "export")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert "REJECTED by the policy, not shipped: int8_size_bytes" in res.stdout + res.stderr
    assert sorted(p.name for p in (project / "artifacts/onnx").iterdir()) == [export.ONNX_FILE]
    verdict = json.loads((project / "metrics/export.json").read_text())["int8_policy"]
    assert verdict["decision"] == "rejected" and not verdict["shipped"]
    assert any(r.startswith("int8_size_bytes") and r.endswith("fail") for r in verdict["reasons"])
    after = client.get_model_version(reg["model_name"], str(reg["version"]))
    assert sorted(after.aliases) == aliases and after.tags["decision"] == version.tags["decision"]
    assert after.tags["int8.decision"] == "rejected" and after.tags["reason.int8_size_bytes"].endswith("fail")
    assert len(client.search_model_versions(f"name = '{reg['model_name']}'")) == 1  # nothing new registered
    res = kd(project, "stage", "report")
    assert res.returncode == 0, res.stderr
    assert "The int8 policy rejected it and it is not shipped" in (project / "reports/model_card.md").read_text()
    monkeypatch.setenv("COLUMNS", "220")  # wide enough for every column of the table
    status = kd(project, "status", "--limit", "1")
    assert status.returncode == 0, status.stderr
    assert "KiB" in status.stdout and "% same" in status.stdout and "rejected" in status.stdout  # int8 beside fp32


def test_labels_alone_kept_by_the_search_is_the_baselines_twin(project: Path) -> None:
    """The configured setting is kept unless another beats it significantly; when the configured setting
    is labels alone, the student trains with the baseline's recipe and is its twin, weight for weight."""
    write_params(project, {"distill": {"alpha": 0.0, "search": {"epochs": 2, "candidates": [{"alpha": 0.9}],
                                                                "max_p_value": 1e-300, "min_val_rows": 1000,
                                                                "folds": 2}}})
    res = dvc(project, "repro", "train_student", "train_baseline")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    record = json.loads((project / "artifacts/student/search.json").read_text())
    assert record["chosen"] == "alpha 0 (labels only)"
    best = max(record["trials"], key=lambda t: t["val_accuracy"])
    assert best["label"] == record["chosen"] or record["decision"].startswith("not separable")  # the gate held
    # 400 validation rows < min_val_rows: both settings scored by 2-fold over every labelled row, each once
    assert record["scored_by"].startswith("2-fold over the 4000 labelled rows")
    assert all(t["folds"] == 2 and t["scored_rows"] == 4000 for t in record["trials"])
    student, twin = (project / "artifacts" / role / models.WEIGHTS_FILE for role in ("student", "baseline"))
    assert student.read_bytes() == twin.read_bytes()
