"""export_and_check scores the test rows a chunk at a time (lm: 4,096 tokens x 49,152 classes would be 805 MB
of logits per array), and a classifier's figures are exactly those of whole-array scoring."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kd_core import export, models, tasks
from kd_core.config import ExportParams
from kd_core.data import Schema

SCHEMA = Schema(tuple(f"f{i}" for i in range(5)), "y", (0, 1, 2))
TASK = tasks.get("tabular")


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1)  # (300,) in 0..2
    spec = models.ModelSpec("mlp", {"hidden": [16]}, SCHEMA)
    folder = tmp_path_factory.mktemp("export") / "student"
    TASK.save(models.build(spec, x, seed=0), spec, folder)
    return folder, x, y


def whole_arrays(folder: Path, out: Path, x: np.ndarray, y: np.ndarray) -> dict[str, dict]:
    """The figures as export_and_check computed them before it streamed: every logit of the split at once."""
    ref = TASK.predict_logits(TASK.load(folder)[0], x)
    got = {"pytorch": {"accuracy": float((ref.argmax(1) == y).mean())}}
    for name, file in (("onnx", export.ONNX_FILE), ("onnx_int8", export.INT8_FILE)):
        logits = export._run_onnx(export.session(out / file, 1), x)
        diff = np.abs(logits - ref)
        acc = float((logits.argmax(1) == y).mean())
        got[name] = {"accuracy": acc, "max_abs_logit_diff": float(diff.max()),
                     "mean_abs_logit_diff": float(diff.mean()),
                     "agreement_with_pytorch": float((logits.argmax(1) == ref.argmax(1)).mean()),
                     "accuracy_drop": got["pytorch"]["accuracy"] - acc}
    return got


def run(student, out: Path) -> dict[str, dict]:
    folder, x, y = student
    report = export.export_and_check(TASK, folder, x, y, out, export.Int8Inputs(x[:32], x[32:96], ExportParams()))
    assert report.rows == len(x)
    return report.to_json()["student"]


def test_a_classifiers_figures_are_exactly_the_whole_array_ones(student, tmp_path: Path) -> None:
    got = run(student, tmp_path)
    want = whole_arrays(student[0], tmp_path, student[1], student[2])
    for runtime, figures in want.items():
        for key, value in figures.items():
            assert got[runtime][key] == value, (runtime, key)  # identical, not merely close
    assert "perplexity" not in got["onnx"]


def test_the_test_rows_are_scored_a_chunk_at_a_time(student, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(export, "CHUNK_LOGITS", 3 * 40, raising=False)  # 40 rows of 3 classes
    calls, predict = [], TASK.predict_logits
    monkeypatch.setattr(TASK, "predict_logits", lambda model, rows: calls.append(len(rows)) or predict(model, rows))
    got = run(student, tmp_path)
    assert calls and max(calls) == 40 and sum(calls) == len(student[1])
    want = whole_arrays(student[0], tmp_path, student[1], student[2])
    for runtime, figures in want.items():
        for key, value in figures.items():
            assert got[runtime][key] == pytest.approx(value, rel=1e-6, abs=1e-12), (runtime, key)

