"""Evaluation and export stream the test rows: every metric summed batch by batch equals the same metric
computed directly on the whole split's logits (to float tolerance), and no step sees more rows than its batch."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_core import evaluate, export, models, quantize, tasks
from kd_core.data import Schema

SCHEMA = Schema(tuple(f"f{i}" for i in range(5)), "y", ("a", "b", "c", "d"))


def _data(n: int = 203, k: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(n, k)) * 3).astype(np.float32)  # (N, K): confidences spread over the bins
    return logits, rng.integers(0, k, n), rng.integers(0, k, n)  # labels (N,), a teacher's top-1 (N,)


def _direct_nll(logits: np.ndarray, y: np.ndarray) -> float:
    return float(-torch.log_softmax(torch.from_numpy(logits).double(), 1)[torch.arange(len(y)), y].mean())


@pytest.mark.parametrize("step", [1, 17, 203])
def test_scores_summed_in_batches_equal_the_whole_split(step: int) -> None:
    logits, y, teacher = _data()
    scores = evaluate.Scores(4)
    for i in range(0, len(y), step):
        scores.add(logits[i:i + step], y[i:i + step], teacher[i:i + step])
    pred = logits.argmax(1)
    assert scores.rows == len(y) and scores.accuracy == float((pred == y).mean())
    assert scores.agree == int((pred == teacher).sum())
    assert scores.nll_mean == pytest.approx(_direct_nll(logits, y), rel=1e-6)
    assert scores.ece == pytest.approx(evaluate.ece(logits, y), abs=1e-9)
    _, conf, acc, counts = evaluate.reliability_bins(logits, y)
    np.testing.assert_array_equal(scores.bin_rows, counts)
    full = counts > 0
    np.testing.assert_allclose(scores.bin_conf[full] / counts[full], conf[full], rtol=1e-6)
    np.testing.assert_allclose(scores.bin_correct[full] / counts[full], acc[full], rtol=1e-12)
    want = {c: float((pred[y == i] == i).mean()) for i, c in enumerate("abcd") if (y == i).any()}
    assert scores.per_class_accuracy(tuple("abcd")) == want


def test_scores_of_no_rows_and_of_an_absent_class() -> None:
    scores = evaluate.Scores(3)
    assert scores.accuracy == 0.0 and scores.ece == 0.0 and math.isnan(scores.nll_mean)
    scores.add(np.array([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0]], np.float32), np.array([0, 0]), np.array([0, 1]))
    assert scores.per_class_accuracy(("x", "y", "z")) == {"x": 0.5}  # no row of class y or z: not reported


def test_classifier_scores_stream_the_test_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The stage's path: no model sees more than CHUNK_ROWS rows at once, and the metrics are those of the
    whole split's logits."""
    task = tasks.get("tabular")
    x = np.random.default_rng(1).normal(size=(50, 5)).astype(np.float32)
    y = np.random.default_rng(2).integers(0, 4, 50)
    spec = models.ModelSpec("mlp", {"hidden": [8]}, SCHEMA)
    loaded = {r: (models.build(spec, x, seed=s), spec) for s, r in enumerate(("teacher", "student"))}
    weights = {r: tmp_path / r for r in loaded}
    for f in weights.values():
        f.write_bytes(b"w")
    seen: list[int] = []
    predict = task.predict_logits
    monkeypatch.setattr(task, "predict_logits", lambda m, rows: seen.append(len(rows)) or predict(m, rows))
    monkeypatch.setattr(evaluate, "CHUNK_ROWS", 16)
    got = evaluate.classifier_scores(task, loaded, x, y, weights)
    assert max(seen) == 16 and sum(seen) == 50 * 2  # 16 + 16 + 16 + 2 rows, once per model
    teacher_pred = predict(loaded["teacher"][0], x).argmax(1)
    for role, (model, _) in loaded.items():
        logits = predict(model, x)  # (50, 4): the direct computation
        m = got[role]
        assert m["accuracy"] == float((logits.argmax(1) == y).mean())
        assert m["agreement_with_teacher"] == float((logits.argmax(1) == teacher_pred).mean())
        assert m["nll"] == pytest.approx(_direct_nll(logits, y), rel=1e-5)
        assert m["ece"] == pytest.approx(evaluate.ece(logits, y), abs=1e-7)
        assert m["size_bytes"] == 1 and m["params"] == evaluate.count_params(model)
    assert got["teacher"]["agreement_with_teacher"] == 1.0


def test_diff_summed_in_batches_equals_the_whole_split() -> None:
    logits, _, _ = _data(seed=3)
    ref = logits + np.random.default_rng(4).normal(scale=0.5, size=logits.shape).astype(np.float32)
    diff = quantize.Diff()
    for i in range(0, len(logits), 50):
        diff.add(logits[i:i + 50], ref[i:i + 50])
    diff.add(logits[:0], ref[:0])  # an empty batch changes nothing
    whole = np.abs(logits - ref)
    assert diff.agreement == float((logits.argmax(1) == ref.argmax(1)).mean())
    assert diff.max_abs == float(whole.max())
    assert diff.mean_abs == pytest.approx(float(whole.mean()), rel=1e-6)
    bad = logits.copy()
    bad[7, 1] = np.nan
    nan = quantize.Diff()
    nan.add(bad[:10], ref[:10])
    nan.add(logits[10:], ref[10:])
    assert math.isnan(nan.max_abs)  # a NaN anywhere stays: the fp32 export check fails on it


def test_export_tally_summed_in_batches_equals_the_whole_split() -> None:
    """lm's export figures (perplexity from summed NLL, next-token accuracy, |Δlogit| against PyTorch)."""
    logits, y, _ = _data(n=96, k=11, seed=5)
    ref = logits * 1.01
    tally, pt = export._Tally(), export._Tally()
    for i in range(0, len(y), 32):
        pt.add(ref[i:i + 32], y[i:i + 32], None, lm=True)
        tally.add(logits[i:i + 32], y[i:i + 32], ref[i:i + 32], lm=True)
    v = export._compare(tally, pt, 1, 0.0, lm=True)
    assert v.perplexity == pytest.approx(math.exp(_direct_nll(logits, y)), rel=1e-6)
    assert v.accuracy == float((logits.argmax(1) == y).mean())
    assert v.accuracy_drop == pytest.approx(float((ref.argmax(1) == y).mean()) - v.accuracy)
    assert v.max_abs_logit_diff == float(np.abs(logits - ref).max())
    assert v.agreement_with_pytorch == float((logits.argmax(1) == ref.argmax(1)).mean())


def test_scoring_chunks_hold_a_bounded_number_of_logits() -> None:
    assert export.chunk_rows(128, 49_152) == 2  # lm: two sequences of 128 positions x 49,152 classes
    assert export.chunk_rows(1, 10) == export.CHUNK_LOGITS // 10  # a classifier's split is one chunk
    assert export.chunk_rows(4096, 1 << 20) == 1  # always at least one row


def test_minmax_calibration_does_not_depend_on_the_batch(tmp_path: Path) -> None:
    """lm calibrates two sequences per pass (one pass's logits are what ONNX Runtime holds); min-max ranges
    are the same whatever the batch, so the int8 file is too."""
    x = np.random.default_rng(6).normal(size=(32, 5)).astype(np.float32)
    spec = models.ModelSpec("mlp", {"hidden": [16]}, SCHEMA)
    src = tmp_path / export.ONNX_FILE
    export.to_onnx(models.build(spec, x, seed=0), tasks.get("tabular"), spec, src)
    for batch in (2, 32):
        quantize.quantize(src, tmp_path / f"{batch}.onnx", "minmax", "features", x, batch=batch)
    assert (tmp_path / "2.onnx").read_bytes() == (tmp_path / "32.onnx").read_bytes()
