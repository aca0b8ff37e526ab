"""A kd text model directory is a standard Hugging Face one: transformers' Auto classes, AutoTokenizer and
`pipeline` read it without a missing or left-over weight and answer as kd does; directories written the
earlier way (kd's `net.` names) still load; a file whose weights do not fit is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from kd_core.data import Schema
from kd_core.errors import UserError
from kd_core.models import WEIGHTS_FILE, ModelSpec
from kd_core.tasks import _hf as hf
from kd_core.tasks.text import data as text_data
from kd_core.tasks.text import models as text_models
from kd_core.tasks.text.models import TextClassifier
from kd_core.tasks.text.task import TEACHER_ARCH, TextTask
from tests.text.conftest import LABEL, LABELS, TEXT, corpus

CLASSES = tuple(LABELS)
MAX_LENGTH = 64


@pytest.fixture(scope="module")
def schema(tiny_encoder: Path) -> Schema:
    info = text_data.TextInfo(MAX_LENGTH, 0, 12, hf.file_sha256(tiny_encoder / "tokenizer.json"))
    return Schema((TEXT,), LABEL, CLASSES, info.to_json())


@pytest.fixture(scope="module")
def texts() -> list[str]:
    out = corpus(6, seed=5)[TEXT].tolist()
    out[2] = " ".join(out[2:5])  # one long one: the batch is padded
    return out


@pytest.fixture(scope="module")
def saved(tiny_encoder: Path, schema: Schema, tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[TextClassifier, ModelSpec, Path]:
    """A 'layers' student (its head trained a little away from zero), saved by kd."""
    spec = ModelSpec("layers", {"layers": [0, 2]}, schema, "text")
    model = TextTask().build(spec, None, 0, tiny_encoder).eval()
    with torch.no_grad():
        model.net.classifier.bias.copy_(torch.tensor([0.3, -0.2, 0.1]))
    out = tmp_path_factory.mktemp("text-hf") / "student"
    text_models.save(model, spec, out)
    return model, spec, out


def kd_ids(model: TextClassifier, texts: list[str]) -> np.ndarray:
    """Right-padded ids as kd builds them (the model's tokenizer, truncated to max_length).  # (N, L)"""
    rows, _ = text_data.encode(text_models.tokenizer(model), texts, MAX_LENGTH)
    return text_data.pad(pd.Series(rows, dtype=object), MAX_LENGTH, model.pad_id)


def test_auto_model_loads_every_weight_and_gives_kd_logits(saved, texts: list[str]) -> None:
    from transformers import AutoModelForSequenceClassification

    model, _, out = saved
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "model.json"} \
        <= {p.name for p in out.iterdir()}
    assert not any(k.startswith("net.") for k in load_file(str(out / WEIGHTS_FILE)))
    net, info = AutoModelForSequenceClassification.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert net.config.id2label == dict(enumerate(CLASSES)) and net.config.label2id == {c: i for i, c in
                                                                                      enumerate(CLASSES)}
    ids = kd_ids(model, texts)  # (N, 64)
    want = text_models.predict_logits(model, ids)
    with torch.inference_mode():
        got = net.eval()(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(ids != 0).long()).logits
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)


def test_auto_tokenizer_encodes_as_kd_and_pads_with_kd_pad(saved, texts: list[str]) -> None:
    from transformers import AutoTokenizer

    model, _, out = saved
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.pad_token_id == model.pad_id and tok.model_max_length == MAX_LENGTH
    for text in texts:
        assert tok(text)["input_ids"] == text_models.tokenizer(model).encode(text).ids
    batch = tok(texts, padding="max_length", truncation=True, max_length=MAX_LENGTH, return_tensors="np")
    np.testing.assert_array_equal(batch["input_ids"], kd_ids(model, texts))
    assert set(batch) == {"input_ids", "attention_mask"}  # what kd feeds: no token_type_ids
    assert (out / "tokenizer.json").read_bytes() == model.tokenizer_json  # kd's bytes, unchanged
    assert json.loads((out / "tokenizer_config.json").read_text())["pad_token"] == "[PAD]"


def test_pipeline_answers_with_a_class(saved, texts: list[str]) -> None:
    from transformers import pipeline

    model, _, out = saved
    answers = pipeline("text-classification", model=str(out), device="cpu")(texts[:3])
    assert [a["label"] for a in answers] == [CLASSES[i] for i in
                                             text_models.predict_logits(model, kd_ids(model, texts[:3])).argmax(1)]


def test_kd_load_round_trips_and_fingerprint_is_stable(saved, texts: list[str], tmp_path: Path) -> None:
    model, spec, out = saved
    loaded, loaded_spec = text_models.load(out)
    assert loaded_spec == spec
    ids = kd_ids(model, texts)
    np.testing.assert_array_equal(text_models.predict_logits(loaded, ids), text_models.predict_logits(model, ids))
    text_models.save(loaded, loaded_spec, tmp_path / "again")
    assert hf.fingerprint(tmp_path / "again") == hf.fingerprint(out)
    (tmp_path / "again" / "tokenizer_config.json").write_text("{}")
    assert hf.fingerprint(tmp_path / "again") != hf.fingerprint(out)


def old_layout(model: TextClassifier, spec: ModelSpec, out: Path) -> Path:
    """A directory as save wrote it before: TextClassifier.state_dict() (`net.` names), config, tokenizer, spec."""
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS_FILE))
    model.net.config.to_json_file(str(out / "config.json"))
    (out / "tokenizer.json").write_bytes(model.tokenizer_json)
    (out / "model.json").write_text(json.dumps(spec.to_json()))
    return out


def test_an_old_directory_still_loads_with_equal_logits(saved, texts: list[str], tmp_path: Path) -> None:
    model, spec, _ = saved
    old = old_layout(model, spec, tmp_path / "old")
    assert all(k.startswith("net.") for k in load_file(str(old / WEIGHTS_FILE)))
    loaded, _ = text_models.load(old)
    ids = kd_ids(model, texts)
    np.testing.assert_array_equal(text_models.predict_logits(loaded, ids), text_models.predict_logits(model, ids))


@pytest.mark.parametrize("layout", ["new", "old"])
def test_a_weight_under_a_wrong_name_is_a_one_line_error(saved, layout: str, tmp_path: Path) -> None:
    model, spec, out = saved
    where = tmp_path / layout
    if layout == "new":
        text_models.save(model, spec, where)
    else:
        old_layout(model, spec, where)
    state = load_file(str(where / WEIGHTS_FILE))
    key = next(k for k in state if k.endswith("classifier.weight"))
    state[key.replace("classifier", "classifyer")] = state.pop(key)
    save_file(state, str(where / WEIGHTS_FILE))
    with pytest.raises(UserError, match=r"model.safetensors does not match its config.json: missing \[.*"
                                        r"classifier.weight.*unexpected \[.*classifyer") as err:
        text_models.load(where)
    assert "\n" not in str(err.value)
    (where / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(UserError, match="not a valid safetensors file"):
        text_models.load(where)


@pytest.mark.parametrize("layout", ["new", "old"])
def test_a_kd_teacher_dir_gives_its_weights_to_init_and_adopt(tiny_encoder: Path, schema: Schema, layout: str,
                                                              tmp_path: Path) -> None:
    """A kd directory is also a Hugging Face one; whichever way build and adopt read it, the weights are the
    teacher's, and the adopted copy is a Hugging Face directory."""
    task = TextTask()
    spec = ModelSpec(TEACHER_ARCH, {}, schema, "text")
    teacher = task.build(spec, None, 0, tiny_encoder)
    with torch.no_grad():
        hf.encoder_layers(teacher.net)[2].output.dense.weight.add_(1.0)  # unlike the encoder's
        teacher.net.classifier.bias.add_(0.5)
    src = tmp_path / "teacher"
    task.save(teacher, spec, src) if layout == "new" else old_layout(teacher, spec, src)
    student = task.build(ModelSpec("layers", {"layers": [0, 2]}, schema, "text"), None, 1, src)
    assert torch.equal(hf.encoder_layers(student.net)[1].output.dense.weight,
                       hf.encoder_layers(teacher.net)[2].output.dense.weight)
    assert torch.equal(student.net.classifier.bias, teacher.net.classifier.bias)
    if layout == "new":  # read as a plain Hugging Face directory, the same weights
        net = text_models.pretrained(src, CLASSES, require_head=True)
        assert all(torch.equal(v, teacher.net.state_dict()[k]) for k, v in net.state_dict().items())
    (tmp_path / "adopted").mkdir()
    adopted = task.adopt(src, None, schema, tmp_path / "adopted")  # type: ignore[arg-type]
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in adopted.state_dict().items())
    assert not any(k.startswith("net.") for k in load_file(str(tmp_path / "adopted" / WEIGHTS_FILE)))
    assert (tmp_path / "adopted" / "tokenizer_config.json").is_file()
    reloaded, _ = text_models.load(tmp_path / "adopted")
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in reloaded.state_dict().items())


def test_a_weight_of_another_shape_is_a_one_line_error(saved, tmp_path: Path) -> None:
    model, spec, _ = saved
    text_models.save(model, spec, tmp_path / "m")
    state = load_file(str(tmp_path / "m" / WEIGHTS_FILE))
    state["classifier.weight"] = torch.zeros(4, state["classifier.weight"].shape[1])  # 4 classes, not 3
    save_file(state, str(tmp_path / "m" / WEIGHTS_FILE))
    with pytest.raises(UserError, match=r"does not match its config.json: classifier.weight is \[4, 32\] in the "
                                        r"file, \[3, 32\] by the config") as err:
        text_models.load(tmp_path / "m")
    assert "\n" not in str(err.value)
