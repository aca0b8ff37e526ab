"""`task: text` — a row is a document: its token ids under the teacher's tokenizer; models are Hugging
Face sequence classifiers (kd_core.tasks.text.models), the teacher fine-tuned from a local encoder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import numpy as np
import pandas as pd
import torch
from torch import nn

from kd_core import data
from kd_core.config import Params, StudentParams, TeacherParams
from kd_core.data import TOKENIZER_FILE, Schema, Splits
from kd_core.errors import UserError
from kd_core.models import META_FILE, ModelSpec, arch_dir
from kd_core.tasks import _hf as hf
from kd_core.tasks._hf import CONFIG_FILE
from kd_core.tasks.base import Classifier, classify, labelled_then_transfer
from kd_core.tasks.text import data as text_data
from kd_core.tasks.text import models as text_models
from kd_core.tasks.text.models import STUDENT_ARCHS, TextClassifier

TEACHER_ARCH = "finetune"  # the teacher's spec: the init encoder with a new classification head


class TextTask(Classifier):
    name = "text"
    builtin_sources: tuple[str, ...] = ("fortunes",)  # the FreeBSD fortunes demo
    file_sources: tuple[str, ...] = ("parquet",)  # tables with a text column
    requirements: tuple[str, ...] = ("transformers", "tokenizers")
    input_name = "input_ids"  # the ONNX input: (B, L) padded token ids
    dynamic_axes: tuple[int, ...] = (0, 1)

    def check_params(self, params: Params) -> None:
        if params.teachers:
            raise ValueError("teachers: an ensemble of text teachers is not supported; use the teacher section")

    def prepare(self, params: Params, root: Path, out: Path) -> Splits:
        """Read the documents and tokenise them with the teacher's own tokenizer (copied beside them)."""
        splits = text_data.load_source(params.data, root)
        source = text_data.teacher_source_dir(params.teacher, root)
        if (source / CONFIG_FILE).is_file():  # without one, pretrained() names the problem at the teacher
            config = SimpleNamespace(**json.loads((source / CONFIG_FILE).read_text()))
            hf.check_positions(config, params.data.max_length, f"the teacher {source}")
        tokenizer = source / TOKENIZER_FILE
        splits = text_data.tokenised(splits, tokenizer, params.data.max_length)
        data.write_prepared(splits, out, tokenizer)
        return splits

    def describe(self, schema: Schema) -> str:
        return (f"a document (column `{schema.features[0]}`, up to {schema.text_info['max_length']} tokens of the "
                "teacher's tokenizer)")

    def inputs(self, frame: pd.DataFrame, schema: Schema) -> np.ndarray:
        info = schema.text_info
        return text_data.pad(frame[text_data.IDS], info["max_length"], info["pad_id"])  # (N, L) int64

    def labels(self, frame: pd.DataFrame, schema: Schema) -> np.ndarray:
        return data.label_indices(frame, schema)  # (N,)

    def cache_inputs(self, splits: Splits, views: np.ndarray | None = None) -> np.ndarray:
        return labelled_then_transfer(self, splits)

    def spec(self, section: TeacherParams | StudentParams, schema: Schema, root: Path | None = None) -> ModelSpec:
        if isinstance(section, TeacherParams):
            return ModelSpec(TEACHER_ARCH, {}, schema, self.name)
        if section.arch not in STUDENT_ARCHS and not arch_dir(section.arch, root).is_dir():
            raise UserError(f"student.arch {section.arch!r}: not a text student; choose one of {list(STUDENT_ARCHS)} "
                            "or a Hugging Face config directory")
        return ModelSpec(section.arch, dict(section.options), schema, self.name, root)

    def init_dir(self, params: Params, root: Path) -> Path | None:
        """The encoder the teacher is fine-tuned from, or the given teacher: students start from it too."""
        return text_data.teacher_source_dir(params.teacher, root)

    def build(self, spec: ModelSpec, x_train: np.ndarray | None, seed: int | None,
              init: Path | None = None) -> TextClassifier:
        if init is None:
            raise UserError("a text model is built from a pretrained encoder directory (teacher.init)")
        tokenizer = (init / TOKENIZER_FILE).read_bytes()
        if hashlib.sha256(tokenizer).hexdigest() != spec.schema.text_info["tokenizer_sha256"]:
            raise UserError(f"{init / TOKENIZER_FILE}: not the tokenizer the prepared data was tokenised with; "
                            "run the prepare stage again")
        if seed is not None:
            torch.manual_seed(seed)  # the new classification head
        source = (text_models.load(init)[0].net if (init / META_FILE).is_file()  # a kd text model (a given teacher)
                  else text_models.pretrained(init, spec.schema.classes))
        options = dict(spec.options)
        try:
            if spec.arch == TEACHER_ARCH:
                net = source
            elif spec.arch == "layers":
                net = hf.layer_subset(source, list(options.pop("layers")), **options)
            elif spec.arch == "narrow":
                net = text_models.narrow(source, seed, **options)
            else:
                text_models.check_tokenizer(spec.arch_dir(), spec.schema.text_info["tokenizer_sha256"])
                net = text_models.from_config_dir(spec.arch_dir(), source, spec.schema.classes, seed, **options)
        except (TypeError, KeyError) as exc:
            raise UserError(f"student.arch {spec.arch!r} rejected its options {spec.options}: {exc}") from None
        where = f"the teacher {init}" if spec.arch == TEACHER_ARCH else f"student.arch {spec.arch}"
        hf.check_positions(net.config, spec.schema.text_info["max_length"], where)
        return TextClassifier(net, spec.schema.text_info["pad_id"], tokenizer)

    def teacher_source(self, source: str, root: Path) -> Path:
        return root / source

    def adopt(self, src: Path, section: TeacherParams, schema: Schema, out: Path) -> TextClassifier:
        """A fine-tuned classifier: a kd text model directory, or a Hugging Face one with a trained head."""
        if not src.is_dir():
            raise UserError(f"teacher.source {src}: a text teacher is a model directory, not a file")
        if (src / META_FILE).is_file():
            model, spec = text_models.load(src)
            if tuple(map(str, spec.schema.classes)) != tuple(map(str, schema.classes)):
                raise UserError(f"teacher {src} predicts classes {list(spec.schema.classes)}, "
                                f"the training labels are {list(schema.classes)}")
            text_models.copy_dir(src, out, model, spec)
            return model
        net = text_models.pretrained(src, schema.classes, require_head=True)
        model = TextClassifier(net, schema.text_info["pad_id"], (src / TOKENIZER_FILE).read_bytes())
        text_models.save(model, ModelSpec(TEACHER_ARCH, {"source": src.name}, schema, self.name), out)
        return model

    def save(self, model: nn.Module, spec: ModelSpec, out: Path) -> None:
        text_models.save(cast(TextClassifier, model), spec, out)

    def load(self, path: Path) -> tuple[TextClassifier, ModelSpec]:
        return text_models.load(path)

    def fingerprint(self, path: Path) -> str:
        return hf.fingerprint(path)

    def lengths(self, x: np.ndarray, schema: Schema) -> np.ndarray | None:
        return (x != schema.text_info["pad_id"]).sum(axis=1)  # (N,) tokens

    def batch_order(self, model: nn.Module, x: np.ndarray) -> np.ndarray:
        return text_models.by_length(x, cast(TextClassifier, model).pad_id)

    def positions(self, x: np.ndarray) -> int:
        return 1

    def cache_batch(self, model: nn.Module, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(text_models.trim_padding(rows, cast(TextClassifier, model).pad_id))

    def cache_logits(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model(batch)  # (B, L) -> (B, C): one document is one cache row

    def predict_logits(self, model: nn.Module, x: np.ndarray) -> np.ndarray:
        return text_models.predict_logits(cast(TextClassifier, model), x)

    def serving_inputs(self, model: nn.Module, spec: ModelSpec, frame: pd.DataFrame) -> np.ndarray:
        """Raw text in the model's text column -> its padded ids under the model's own tokenizer."""
        col, info = spec.schema.features[0], spec.schema.text_info
        if col not in frame.columns:
            raise UserError(f"input lacks the text column {col!r} (columns: {list(frame.columns)[:8]})")
        values = frame[col].tolist()
        if bad := [i for i, v in enumerate(values) if not isinstance(v, str)]:
            raise UserError(f"input column {col!r}: {len(bad)} row(s) are not text, e.g. row {bad[0]}: "
                            f"{values[bad[0]]!r}")
        ids, _ = text_data.encode(text_models.tokenizer(cast(TextClassifier, model)), values, info["max_length"])
        return text_data.pad(pd.Series(ids, dtype=object), info["max_length"], info["pad_id"])  # (N, L)

    def answer(self, model: nn.Module, spec: ModelSpec, frame: pd.DataFrame, params: dict) -> np.ndarray | pd.DataFrame:
        return classify(self, model, spec, frame, params)

    def input_example(self, model: nn.Module, frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
        return frame[[schema.features[0]]].head(5).astype(object)

    def example(self, spec: ModelSpec, batch: int = 1) -> torch.Tensor:
        return text_models.example_ids(spec, batch)  # (batch, median length)
