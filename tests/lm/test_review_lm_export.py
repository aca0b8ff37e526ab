"""export_and_check on `lm`: the held-out sequences are scored a few at a time, and the perplexity and
agreement summed over the chunks are those of the whole split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kd_core import export, models, tasks
from kd_core.config import ExportParams
from kd_core.data import Schema
from kd_core.tasks.lm import models as lm_models
from kd_core.tasks.lm import scoring as lm_eval
from kd_core.tasks.lm.data import LMInfo
from tests.lm.conftest import build_llama, vocab_size


def test_lm_perplexity_streams_over_sequences(tmp_path: Path, lm_tokenizer_json: bytes,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny Llama: the per-runtime perplexity summed over chunks of sequences is lm_eval's on the whole split."""
    blob = lm_tokenizer_json
    n = vocab_size(blob)
    net = lm_models.load_source(build_llama(tmp_path / "hf", blob, layers=1))
    info = LMInfo(16, 0, n, lm_models.tokenizer_sha256(blob), 100, 96)
    spec = models.ModelSpec("narrow", {}, Schema(("text",), "", tuple(f"t{i}" for i in range(n)), info.to_json()),
                            "lm")
    lm_models.save(lm_models.CausalLM(net, n, blob), spec, tmp_path / "student")
    ids = np.random.default_rng(0).integers(0, n, (6, 17))
    x, y = ids[:, :-1], ids[:, 1:]  # (6, 16) each
    monkeypatch.setattr(export, "CHUNK_LOGITS", n * 16 * 2, raising=False)  # 2 sequences at a time
    task = tasks.get("lm")
    calls, predict = [], task.predict_logits
    monkeypatch.setattr(task, "predict_logits", lambda model, rows: calls.append(len(rows)) or predict(model, rows))
    report = export.export_and_check(task, tmp_path / "student", x, y, tmp_path / "onnx",
                                     export.Int8Inputs(x[:2], x[2:4], ExportParams(methods=("minmax",))))
    assert calls == [2, 2, 2]
    nll, correct = lm_eval.nll_per_sequence(lm_models.load(tmp_path / "student")[0], x, y)
    fp32 = report.student["onnx"]
    assert report.student["pytorch"].perplexity == pytest.approx(lm_eval.perplexity(nll.sum(), y.size), rel=1e-6)
    assert report.student["pytorch"].accuracy == correct.sum() / y.size
    assert fp32.perplexity == pytest.approx(report.student["pytorch"].perplexity, rel=1e-5)
    assert fp32.max_abs_logit_diff < export.FP32_TOLERANCE and fp32.agreement_with_pytorch == 1.0
    assert np.isfinite(report.student["onnx_int8"].perplexity)
