"""What a new user touches after the first run: the model card, `kd status`, `kd compare`, `kd predict`
and `kd export`, on a tiny project run by `dvc repro` (one run for the whole module: it is the slow part);
then which stages an edit to the code makes stale. (A no-op repro and a distill param re-running only the
student side: tests/e2e/test_features_repro.py.)"""

import base64
import json
import re

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import ALL_STAGES, dvc, kd
from tests.conftest import stages_ran as ran
from tests.unit.test_report import png_size

pytestmark = pytest.mark.slow


def one_line_error(res) -> str:
    """A user mistake: exit 1, one `kd: error:` line, no traceback."""
    assert res.returncode == 1, res.stdout + res.stderr
    assert "Traceback" not in res.stderr + res.stdout
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("kd: error: "), res.stderr
    return lines[0]


def test_card_and_user_commands_after_a_run(project):
    res = dvc(project, "repro")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert ran(res.stdout) == ALL_STAGES and (project / "dvc.lock").exists()
    ev = json.loads((project / "metrics/eval.json").read_text())
    reg = json.loads((project / "metrics/register.json").read_text())
    exp = json.loads((project / "metrics/export.json").read_text())

    # the model card: every figure embedded is a PNG file of the card, every number from eval.json
    page = (project / "reports/model_card.html").read_text()
    embedded = {name: blob for blob, name in re.findall(r'src="data:image/png;base64,([^"]+)" data-file="([^"]+)"',
                                                        page)}
    files = sorted(p.relative_to(project / "reports").as_posix() for p in (project / "reports/figures").glob("*.png"))
    assert sorted(embedded) == files and len(files) == 5
    for name, blob in embedded.items():
        data = base64.b64decode(blob)
        assert data == (project / "reports" / name).read_bytes() and min(png_size(data)) > 200
    for role in ("teacher", "baseline", "student"):
        assert f'<td>{role}</td>\n<td style="text-align:right">{ev[role]["accuracy"]:.3f}</td>' in page
    assert (project / "reports/data_docs/index.html").is_file() and 'href="data_docs/index.html"' in page

    # the export: fp32 ONNX matches PyTorch, int8 is smaller and close; both attached to the version
    assert exp["student"]["onnx"]["max_abs_logit_diff"] < 1e-3
    assert exp["student"]["onnx_int8"]["size_bytes"] < exp["student"]["onnx"]["size_bytes"] / 2
    assert abs(exp["student"]["onnx_int8"]["accuracy_drop"]) < 0.05
    client = MlflowClient()
    version = client.get_model_version(reg["model_name"], str(reg["version"]))
    assert float(version.tags["onnx.max_abs_logit_diff"]) < 1e-3 and "onnx_int8.latency_ms_p50" in version.tags
    logged = {a.path for a in client.list_artifacts(version.run_id, "reports")}
    assert {"reports/model_card.html", "reports/model_card.md", "reports/figures"} <= logged
    onnx_files = {a.path for a in client.list_artifacts(version.run_id, "onnx")}
    assert onnx_files >= {"onnx/model.onnx", "onnx/model.int8.onnx"}

    # kd status: the registry as a table, with the version's decision and its test accuracy
    status = kd(project, "status")
    assert status.returncode == 0, status.stderr
    assert reg["decision"] in status.stdout and f"{ev['student']['accuracy']:.3f}" in status.stdout

    # kd compare: the three models side by side, the same numbers as eval.json
    compare = kd(project, "compare")
    assert compare.returncode == 0, compare.stderr
    for role in ("teacher", "baseline", "student"):
        assert role in compare.stdout and f"{ev[role]['accuracy']:.3f}" in compare.stdout

    # kd predict: class names + probabilities from the registered version, on raw rows (columns shuffled)
    test = pd.read_parquet(project / "data/prepared/test.parquet")
    test.iloc[:, ::-1].to_parquet(project / "rows.parquet")
    pred = kd(project, "predict", "rows.parquet", "--version", str(reg["version"]), "--out", "out/preds.parquet")
    assert pred.returncode == 0, pred.stderr
    out = pd.read_parquet(project / "out/preds.parquet")
    probs = out[[f"prob_{c}" for c in range(10)]].to_numpy()
    assert len(out) == len(test) and np.allclose(probs.sum(1), 1, atol=1e-4)
    assert (out["prediction"].to_numpy() == probs.argmax(1)).all()
    assert np.isclose((out["prediction"] == test["label"]).mean(), ev["student"]["accuracy"])
    assert f"accuracy against its 'label' column {ev['student']['accuracy']:.3f}" in pred.stdout
    if "champion" not in reg["aliases"]:
        assert "has no champion yet (hint:" in one_line_error(kd(project, "predict", "rows.parquet"))

    # by default predictions go next to the table, but never into a folder the DAG owns: a new file in
    # data/prepared would change a DVC output and make the next run redo every stage
    scored = kd(project, "predict", "data/prepared/test.parquet", "--version", str(reg["version"]))
    assert scored.returncode == 0, scored.stderr
    assert (project / "predictions/test.predictions.parquet").is_file()
    assert not (project / "data/prepared/test.predictions.parquet").exists()
    assert "data/prepared" not in dvc(project, "status").stdout

    # kd export --version: a registered version exported on its own, results attached to it
    export = kd(project, "export", "--version", str(reg["version"]), "--out", "edge")
    assert export.returncode == 0, export.stderr
    assert (project / "edge/model.int8.onnx").is_file() and (project / "edge/export.json").is_file()
    assert "int8" in export.stdout and "attached to" in export.stdout

    # user mistakes: one line and a hint, never a traceback
    assert "not found (hint:" in one_line_error(kd(project, "predict", "missing.parquet"))
    assert "has no version 99" in one_line_error(kd(project, "predict", "rows.parquet", "--version", "99"))
    test.drop(columns=["x03"]).to_parquet(project / "short.parquet")
    assert "x03" in one_line_error(kd(project, "predict", "short.parquet", "--version", str(reg["version"])))
    (project / "bad.parquet").write_text("not parquet")
    assert "not a readable parquet table" in one_line_error(kd(project, "predict", "bad.parquet"))

    # a code change makes exactly the stages that import the changed module stale (dvc.yaml's deps are
    # generated from the import closures: kd_core/codedeps.py); a task is one package and dvc.yaml names
    # only the selected one (kd_core/tasks/${task}): an edit to the lm package leaves this tabular project
    # up to date, one to its own package makes every stage that asks the task stale
    asks_task = {name for name, body in yaml.safe_load((project / "dvc.yaml").read_text())["stages"].items()
                 if "kd_core/tasks/${task}" in body["deps"]}
    assert {"prepare", "teacher", "train_student", "evaluate"} <= asks_task
    for module, stale in (("kd_core/card/figures.py", {"report"}), ("kd_core/export.py", {"export"}),
                          ("kd_core/losses.py", {"teacher", "cache_logits", "train_student", "train_baseline",
                                                 "export"}),  # export: its quantization-aware fine-tune
                          ("kd_core/tasks/lm/task.py", set()), ("kd_core/tasks/tabular/task.py", asks_task)):
        path = project / module
        original = path.read_text()
        path.write_text(original + "\n# an edit\n")
        status = dvc(project, "status", "--json")
        path.write_text(original)
        assert status.returncode == 0, status.stderr
        assert set(json.loads(status.stdout)) == stale, (module, status.stdout)
