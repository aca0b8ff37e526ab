"""Text classifiers (kd_core.tasks.text.models) on the tiny encoder: how students are initialised from the
teacher's encoder, what is refused, and that logits do not depend on padding, batching or a save/load."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from kd_core.data import Schema
from kd_core.errors import UserError
from kd_core.models import ModelSpec
from kd_core.tasks import _hf as hf
from kd_core.tasks.text import data as text_data
from kd_core.tasks.text import models as text_models
from kd_core.tasks.text.models import TextClassifier
from kd_core.tasks.text.task import TEACHER_ARCH, TextTask
from tests.text.conftest import LABEL, LABELS, TEXT, corpus, other_tokenizer, student_config

CLASSES = tuple(LABELS)


@pytest.fixture(scope="module")
def source(tiny_encoder: Path) -> nn.Module:
    """The tiny encoder as a 3-class sequence classifier: what every student starts from."""
    return text_models.pretrained(tiny_encoder, CLASSES).eval()


@pytest.fixture(scope="module")
def schema(tiny_encoder: Path) -> Schema:
    tok = tiny_encoder / "tokenizer.json"
    info = text_data.TextInfo(64, 0, 12, hf.file_sha256(tok))
    return Schema((TEXT,), LABEL, CLASSES, info.to_json())


@pytest.fixture(scope="module")
def ids(tiny_encoder: Path) -> np.ndarray:
    """Twelve documents of different lengths, right-padded to 64.  # (12, 64)"""
    tok = hf.load_tokenizer((tiny_encoder / "tokenizer.json").read_bytes(), "tiny")
    texts = corpus(12, seed=3)[TEXT].tolist()
    texts[5] = texts[5] + " " + texts[6] + " " + texts[7]  # one long one, so batches differ in width
    rows, _ = text_data.encode(tok, texts, 64)
    return text_data.pad(pd.Series(rows, dtype=object), 64, 0)


def classifier(net: nn.Module, encoder: Path) -> TextClassifier:
    return TextClassifier(net, 0, (encoder / "tokenizer.json").read_bytes()).eval()


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- layer subset: DistilBERT's initialisation --------------------------------------------------------

def test_layer_subset_copies_exactly_the_chosen_layers(source: nn.Module) -> None:
    student = hf.layer_subset(source, [0, 2])
    src_stack, dst_stack = hf.encoder_layers(source), hf.encoder_layers(student)
    assert len(dst_stack) == student.config.num_hidden_layers == 2
    assert len(src_stack) == source.config.num_hidden_layers == 4  # the source is not cut down with it
    for kept, original in zip(dst_stack, (src_stack[0], src_stack[2]), strict=True):
        assert states_equal(kept, original)
    assert states_equal(student.bert.embeddings, source.bert.embeddings)
    assert not states_equal(dst_stack[1], src_stack[1])  # layer 1 was dropped, not kept in place of 2


@pytest.mark.parametrize("layers", [[], [2, 0], [1, 1], [-1, 0], [0, 4]])
def test_layer_subset_refuses_bad_layer_lists(source: nn.Module, layers: list[int]) -> None:
    with pytest.raises(UserError, match="student.options.layers"):
        hf.layer_subset(source, layers)


# --- narrow: PCA-initialised word embeddings --------------------------------------------------------

def with_spectrum(source: nn.Module, seed: int = 0) -> nn.Module:
    """The source with word embeddings of well-separated singular values, so the principal directions are
    well defined (random init has near-ties, whose directions float32 and float64 SVDs may pick differently)."""
    out = copy.deepcopy(source)
    emb = out.get_input_embeddings().weight  # (V, H)
    v, h = emb.shape
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(v, h)))  # (V, H) orthonormal columns
    w, _ = np.linalg.qr(rng.normal(size=(h, h)))  # (H, H)
    s = np.geomspace(5.0, 0.05, h)  # (H,)
    with torch.no_grad():
        emb.copy_(torch.from_numpy(u * s @ w.T + rng.normal(size=h)).float())  # plus an offset the PCA centres away
    return out


def hand_pca(emb: np.ndarray, width: int) -> np.ndarray:
    """The centred embeddings projected on their top `width` right singular vectors, in float64.  # (V, width)"""
    centred = emb - emb.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:width].T


def test_narrow_embeddings_are_the_teachers_principal_components(source: nn.Module) -> None:
    src = with_spectrum(source)
    student = text_models.narrow(src, seed=0, hidden=16, layers=1, heads=2, intermediate=32)
    got = student.get_input_embeddings().weight.detach().double().numpy()  # (V, 16)
    want = hand_pca(src.get_input_embeddings().weight.detach().double().numpy(), 16)  # (V, 16)
    assert got.shape == want.shape == (src.config.vocab_size, 16)
    for j in range(16):  # SVD signs are arbitrary: each column up to its sign
        err = min(np.abs(got[:, j] - want[:, j]).max(), np.abs(got[:, j] + want[:, j]).max())
        assert err < 1e-4, (j, err)
    np.testing.assert_allclose(got @ got.T, want @ want.T, atol=1e-4)  # sign-free: the projected Gram matrix
    assert np.all(np.diff(got.var(axis=0)) <= 1e-9)  # columns by decreasing variance


def test_narrow_student_reads_the_teachers_vocabulary(source: nn.Module) -> None:
    student = text_models.narrow(source, seed=0, hidden=16, layers=1, heads=2, intermediate=32)
    assert student.config.vocab_size == source.config.vocab_size
    assert student.get_input_embeddings().weight.shape == (source.config.vocab_size, 16)
    assert student.config.num_hidden_layers == 1 and student.config.num_labels == len(CLASSES)
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in source.parameters()) / 2


@pytest.mark.parametrize("options", [{"hidden": 64}, {"hidden": 15, "heads": 2}])
def test_narrow_refuses_wider_or_indivisible(source: nn.Module, options: dict) -> None:
    with pytest.raises(UserError, match="hidden"):
        text_models.narrow(source, seed=0, **options)


# --- a Hugging Face config directory ------------------------------------------------------------------

def test_config_dir_student_on_the_teachers_vocabulary(source: nn.Module, tmp_path: Path) -> None:
    net = text_models.from_config_dir(student_config(tmp_path, source.config.vocab_size), source, CLASSES, seed=0)
    assert net.config.num_labels == len(CLASSES) and net.config.hidden_size == 16


def test_config_dir_student_with_another_vocabulary_is_refused(source: nn.Module, tmp_path: Path) -> None:
    folder = student_config(tmp_path, source.config.vocab_size + 7)
    with pytest.raises(UserError, match="vocabulary"):
        text_models.from_config_dir(folder, source, CLASSES, seed=0)
    with pytest.raises(UserError, match="config.json"):
        text_models.from_config_dir(tmp_path / "nothing-here", source, CLASSES, seed=0)


def test_check_tokenizer_refuses_another_tokenizer(tiny_encoder: Path, tmp_path: Path) -> None:
    sha = hf.file_sha256(tiny_encoder / "tokenizer.json")
    text_models.check_tokenizer(tmp_path, sha)  # no tokenizer.json of its own: it reads the teacher's
    (tmp_path / "tokenizer.json").write_bytes((tiny_encoder / "tokenizer.json").read_bytes())
    text_models.check_tokenizer(tmp_path, sha)  # the same file
    other_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(UserError, match="differs from the teacher's tokenizer"):
        text_models.check_tokenizer(tmp_path, sha)


# --- TextTask.build: the stage's entry point -----------------------------------------------------------

def test_task_builds_each_student_kind(tiny_encoder: Path, schema: Schema, ids: np.ndarray) -> None:
    task = TextTask()
    teacher = task.build(ModelSpec(TEACHER_ARCH, {}, schema, "text"), None, 0, tiny_encoder)
    layers = task.build(ModelSpec("layers", {"layers": [1, 3]}, schema, "text"), None, 0, tiny_encoder)
    thin = task.build(ModelSpec("narrow", {"hidden": 16, "layers": 1, "heads": 2, "intermediate": 32}, schema,
                                "text"), None, 0, tiny_encoder)
    assert states_equal(hf.encoder_layers(layers.net)[1], hf.encoder_layers(teacher.net)[3])
    for model in (teacher, layers, thin):
        assert task.predict_logits(model, ids).shape == (len(ids), len(CLASSES))
    with pytest.raises(UserError, match="rejected its options"):
        task.build(ModelSpec("narrow", {"width": 16}, schema, "text"), None, 0, tiny_encoder)


def test_task_build_refuses_an_init_with_another_tokenizer(tiny_encoder: Path, schema: Schema,
                                                           tmp_path: Path) -> None:
    other = Schema(schema.features, schema.label_column, schema.classes,
                   {**schema.text, "tokenizer_sha256": hashlib.sha256(b"another").hexdigest()})
    with pytest.raises(UserError, match="run the prepare stage again"):
        TextTask().build(ModelSpec("narrow", {}, other, "text"), None, 0, tiny_encoder)


def test_task_build_refuses_max_length_beyond_the_models_positions(tiny_encoder: Path, schema: Schema,
                                                                   source: nn.Module, tmp_path: Path) -> None:
    """ids up to data.max_length must fit the position embeddings; else training dies on the first long
    batch with a shape error (a traceback), after prepare and validate have passed."""
    long = Schema(schema.features, schema.label_column, schema.classes, {**schema.text, "max_length": 256})
    with pytest.raises(UserError, match="max_length"):
        TextTask().build(ModelSpec(TEACHER_ARCH, {}, long, "text"), None, 0, tiny_encoder)  # 128 positions
    folder = student_config(tmp_path, source.config.vocab_size, positions=16)
    with pytest.raises(UserError, match="max_length"):  # schema: max_length 64
        TextTask().build(ModelSpec(str(folder), {}, schema, "text"), None, 0, tiny_encoder)


# --- logits: order, padding, batching, save/load, fingerprint ------------------------------------------

def test_predict_logits_rows_keep_input_order(source: nn.Module, tiny_encoder: Path, ids: np.ndarray) -> None:
    model = classifier(source, tiny_encoder)
    got = text_models.predict_logits(model, ids, batch_size=5)  # length-sorted into 3 batches
    with torch.inference_mode():
        one_by_one = np.concatenate([model(torch.from_numpy(ids[i:i + 1])).numpy() for i in range(len(ids))])
    np.testing.assert_allclose(got, one_by_one, atol=1e-5)
    perm = np.random.default_rng(0).permutation(len(ids))
    np.testing.assert_allclose(text_models.predict_logits(model, ids[perm], batch_size=5), got[perm], atol=1e-5)


def test_padding_and_trimming_do_not_change_logits(source: nn.Module, tiny_encoder: Path, ids: np.ndarray) -> None:
    model = classifier(source, tiny_encoder)
    doc = ids[:1, :16]  # (1, 16): every document here is shorter than 16 tokens but the long one
    assert doc[0, -1] == 0
    long = np.zeros((1, 64), np.int64)
    long[:, :16] = doc
    with torch.inference_mode():
        short_logits = model(torch.from_numpy(doc)).numpy()
        model.trim = False  # the export's path: all 64 columns through the encoder, padding masked
        try:
            untrimmed = model(torch.from_numpy(long)).numpy()
        finally:
            model.trim = True
        trimmed = model(torch.from_numpy(long)).numpy()
    np.testing.assert_allclose(untrimmed, short_logits, atol=1e-5)
    np.testing.assert_allclose(trimmed, short_logits, atol=1e-5)


def test_save_load_round_trip_and_fingerprint(tiny_encoder: Path, schema: Schema, ids: np.ndarray,
                                              tmp_path: Path) -> None:
    task = TextTask()
    spec = ModelSpec("narrow", {"hidden": 16, "layers": 1, "heads": 2, "intermediate": 32}, schema, "text")
    model = task.build(spec, None, 0, tiny_encoder)
    text_models.save(model, spec, tmp_path / "a")
    loaded, loaded_spec = text_models.load(tmp_path / "a")
    assert loaded_spec == spec and loaded.tokenizer_json == model.tokenizer_json
    np.testing.assert_array_equal(text_models.predict_logits(loaded, ids), text_models.predict_logits(model, ids))

    text_models.save(loaded, loaded_spec, tmp_path / "b")
    first = hf.fingerprint(tmp_path / "a")
    assert hf.fingerprint(tmp_path / "b") == first  # the same model saved twice: the same identity
    other_tokenizer(tmp_path / "b/tokenizer.json")
    assert hf.fingerprint(tmp_path / "b") != first  # a new tokenizer is a new teacher for the cache


def test_load_names_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "model.json").write_text("{}")
    with pytest.raises(UserError, match="missing model.safetensors, config.json, tokenizer.json"):
        text_models.load(tmp_path)


def test_students_of_a_given_kd_teacher_start_from_its_weights(tiny_encoder: Path, schema: Schema,
                                                                tmp_path: Path) -> None:
    """`teacher.source: <kd text model dir>`: its weights are under `net.` in model.safetensors, which
    Hugging Face's loader does not read; a student must still start from them, not from random weights."""
    task = TextTask()
    teacher = task.build(ModelSpec(TEACHER_ARCH, {}, schema, "text"), None, 0, tiny_encoder)
    with torch.no_grad():
        hf.encoder_layers(teacher.net)[2].output.dense.weight.add_(1.0)  # unlike the encoder's
    task.save(teacher, ModelSpec(TEACHER_ARCH, {}, schema, "text"), tmp_path / "teacher")
    student = task.build(ModelSpec("layers", {"layers": [0, 2]}, schema, "text"), None, 1, tmp_path / "teacher")
    assert states_equal(hf.encoder_layers(student.net)[1], hf.encoder_layers(teacher.net)[2])
    assert torch.equal(student.net.classifier.weight, teacher.net.classifier.weight)  # its trained head too


def test_an_encoder_whose_weights_do_not_match_its_config_is_refused(tiny_encoder: Path, tmp_path: Path) -> None:
    """Loading must not fall back to random weights silently (a teacher trained from noise)."""
    (tmp_path / "enc").mkdir()
    for name in ("config.json", "tokenizer.json"):
        (tmp_path / "enc" / name).write_bytes((tiny_encoder / name).read_bytes())
    from safetensors.torch import save_file
    save_file({"unrelated.weight": torch.zeros(2, 2)}, str(tmp_path / "enc" / "model.safetensors"))
    with pytest.raises(UserError, match="encoder weights are not in its safetensors"):
        text_models.pretrained(tmp_path / "enc", CLASSES)
