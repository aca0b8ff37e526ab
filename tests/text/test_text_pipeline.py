"""`task: text` end to end under `dvc repro`: the example params with the user's parquet tables and the
tiny encoder, through register, export and report. One project, built once for the module (the
expensive part); each test reads one output of that run against the contract in ARCHITECTURE.md."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import yaml

from kd_core.tasks import _hf as hf
from kd_core.tasks.text import data as text_data
from tests.conftest import ALL_STAGES, dvc, kd, stages_ran, write_params
from tests.text.conftest import ENCODER, LABEL, LABELS, TEXT, Tables, text_project

pytestmark = pytest.mark.slow
MODEL_KEYS = {"accuracy", "ece", "nll", "agreement_with_teacher", "params", "macs", "latency_ms_p50", "size_bytes"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: Path,
        text_tables: Tables) -> Iterator[tuple[Path, str]]:
    """The project after one `dvc repro`, and that repro's stdout."""
    with text_project(tmp_path_factory.mktemp("text-e2e"), tiny_encoder, text_tables) as proj:
        res = dvc(proj, "repro")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        yield proj, res.stdout


def read(proj: Path, rel: str) -> dict:
    return json.loads((proj / rel).read_text())


def test_repro_runs_the_whole_dag(run: tuple[Path, str]) -> None:
    proj, stdout = run
    assert stages_ran(stdout) == ALL_STAGES


def test_prepared_data_is_tokenised_by_the_teachers_tokenizer(run: tuple[Path, str]) -> None:
    proj, _ = run
    schema = read(proj, "data/prepared/schema.json")
    assert schema["features"] == [TEXT] and schema["classes"] == LABELS
    info = schema["text"]
    assert info["max_length"] == 32 and info["pad_id"] == 0
    assert info["tokenizer_sha256"] == hf.file_sha256(proj / ENCODER / "tokenizer.json")
    assert (proj / "data/prepared/tokenizer.json").read_bytes() == (proj / ENCODER / "tokenizer.json").read_bytes()
    train = pd.read_parquet(proj / "data/prepared/train.parquet")
    assert all(ids[0] == 2 and ids[-1] == 3 for ids in train[text_data.IDS])  # [CLS] … [SEP]
    assert (train[text_data.TOKENS] == train[text_data.IDS].map(len)).all()  # nothing here is truncated


def test_eval_json_holds_every_model_metric(run: tuple[Path, str]) -> None:
    proj, _ = run
    ev = read(proj, "metrics/eval.json")
    assert {"teacher", "student", "baseline"} <= set(ev)
    for role in ("teacher", "student", "baseline"):
        assert set(ev[role]) >= MODEL_KEYS, (role, sorted(ev[role]))
        assert 0.0 <= ev[role]["accuracy"] <= 1.0 and ev[role]["params"] > 0 and ev[role]["macs"] > 0
    assert ev["teacher"]["accuracy"] > 0.8  # three separable topics: the fine-tuning did learn
    assert ev["student"]["params"] < ev["teacher"]["params"]
    assert ev["teacher"]["agreement_with_teacher"] == 1.0


def test_register_decides_and_export_matches_pytorch(run: tuple[Path, str]) -> None:
    proj, _ = run
    reg = read(proj, "metrics/register.json")
    assert reg["decision"] == "promoted", reg["reasons"]  # the loose policy passes every rule
    assert reg["model_name"] == "kd-student" and reg["version"] == 1 and "champion" in reg["aliases"]
    student = read(proj, "metrics/export.json")["student"]
    assert {"pytorch", "onnx", "onnx_int8"} <= set(student)
    assert student["onnx"]["max_abs_logit_diff"] < 1e-3
    assert student["onnx"]["agreement_with_pytorch"] == 1.0
    assert np.isfinite(student["onnx_int8"]["max_abs_logit_diff"]) and student["onnx_int8"]["size_bytes"] > 0
    assert (proj / "artifacts/onnx/model.onnx").is_file() and (proj / "artifacts/onnx/model.int8.onnx").is_file()


def test_onnx_takes_any_batch_and_sequence_length(run: tuple[Path, str]) -> None:
    import onnxruntime as ort

    proj, _ = run
    sess = ort.InferenceSession(str(proj / "artifacts/onnx/model.onnx"), providers=["CPUExecutionProvider"])
    for shape in ((1, 5), (3, 32), (7, 11)):
        ids = np.full(shape, 7, np.int64)
        ids[:, 0], ids[:, -1] = 2, 3
        (logits,) = sess.run(["logits"], {sess.get_inputs()[0].name: ids})
        assert logits.shape == (shape[0], len(LABELS))


def test_registered_model_answers_raw_text_with_class_names(run: tuple[Path, str], text_tables: Tables) -> None:
    proj, _ = run
    test = pd.read_parquet(text_tables.test)
    model = mlflow.pyfunc.load_model("models:/kd-student/1")
    queries = pd.DataFrame({TEXT: [*test[TEXT], "Une chanson très naïve au piano, mañana!", ""]})
    preds = np.asarray(model.predict(queries))
    assert len(preds) == len(queries) and set(preds) <= set(LABELS)
    assert np.mean(preds[:len(test)] == test[LABEL].to_numpy()) > 0.6  # the raw text went through the tokenizer
    probs = model.predict(queries.head(4), params={"output": "probabilities"})
    assert list(probs.columns) == LABELS
    np.testing.assert_allclose(probs.to_numpy().sum(axis=1), 1.0, atol=1e-5)


def test_int8_is_calibrated_static_and_qad_fine_tunes_a_text_student(run: tuple[Path, str]) -> None:
    """Sequence inputs: static recipes calibrated on training documents and the weight-only dynamic forms
    measured side by side, then QAD from the cache; both int8 files take any batch and sequence length and
    are compared with the registered fp32 student."""
    import onnxruntime as ort

    proj, _ = run
    static = read(proj, "metrics/export.json")["int8"]
    assert static["source"] == "student" and static["calibration_rows"] > 0
    tried = {c["method"] for c in static["candidates"]}
    assert {"minmax", "dynamic", "dynamic_matmul"} <= tried and static["method"] in tried
    before = (proj / "params.yaml").read_text()
    write_params(proj, {"export": {"int8": "qad", "qad_epochs": 1, "methods": ["minmax"]}})
    try:
        res = kd(proj, "export", "--out", "edge-qad")
    finally:
        (proj / "params.yaml").write_text(before)  # the module's later tests expect the DAG unchanged
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = read(proj, "edge-qad/export.json")
    assert report["int8"]["source"] == "qad" and report["int8"]["lineage"]["qad_epochs"] == "1"
    assert report["student"]["onnx_int8"]["agreement_with_pytorch"] > 0.5
    sess = ort.InferenceSession(str(proj / "edge-qad/model.int8.onnx"), providers=["CPUExecutionProvider"])
    for shape in ((1, 5), (3, 32)):
        ids = np.full(shape, 7, np.int64)
        ids[:, 0], ids[:, -1] = 2, 3
        (logits,) = sess.run(["logits"], {sess.get_inputs()[0].name: ids})
        assert logits.shape == (shape[0], len(LABELS))
    shutil.rmtree(proj / "edge-qad")


def test_model_card_is_written(run: tuple[Path, str]) -> None:
    proj, _ = run
    md = (proj / "reports/model_card.md").read_text()
    assert (proj / "reports/model_card.html").stat().st_size > 0
    assert "narrow" in md and "document" in md


def test_second_repro_is_a_no_op(run: tuple[Path, str]) -> None:
    """Tokenised splits, the tokenizer copy and every text model are reproducible outputs: nothing is stale."""
    proj, _ = run
    res = dvc(proj, "repro")
    assert res.returncode == 0, res.stderr[-2000:]
    assert stages_ran(res.stdout) == set(), res.stdout[-2000:]


def test_layers_student_trains_from_the_cache(run: tuple[Path, str]) -> None:
    """Last in the module: it replaces the narrow student with a layer-subset one."""
    proj, _ = run
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["student"] = {"arch": "layers", "options": {"layers": [0, 2]}}  # replaced, not merged with narrow's
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    res = kd(proj, "stage", "train_student")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    spec = read(proj, "artifacts/student/model.json")
    assert spec["arch"] == "layers" and spec["task"] == "text"
    assert read(proj, "artifacts/student/config.json")["num_hidden_layers"] == 2
