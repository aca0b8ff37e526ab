"""`task: tabular` — a row is a vector of numeric features; models are kd_core architectures."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from kd_core import data, models
from kd_core.config import Params, StudentParams, TeacherParams
from kd_core.data import Schema, Splits
from kd_core.errors import UserError
from kd_core.models import KDModel, ModelSpec
from kd_core.tasks.base import Classifier, classify, labelled_then_transfer


class TabularTask(Classifier):
    name = "tabular"
    builtin_sources: tuple[str, ...] = ("mnist1d",)
    file_sources: tuple[str, ...] = ("parquet",)
    requirements: tuple[str, ...] = ()
    input_name = "features"  # the ONNX input: (B, F) raw rows
    dynamic_axes: tuple[int, ...] = (0,)

    def prepare(self, params: Params, root: Path, out: Path) -> Splits:
        splits = data.load_source(params.data, root)
        data.write_prepared(splits, out)
        return splits

    def describe(self, schema: Schema) -> str:
        f = schema.features
        return f"a row of {len(f)} numeric features (`{f[0]}` … `{f[-1]}`)"

    def inputs(self, frame: pd.DataFrame, schema: Schema) -> np.ndarray:
        return data.features_array(frame, schema)  # (N, F) float32

    def labels(self, frame: pd.DataFrame, schema: Schema) -> np.ndarray:
        return data.label_indices(frame, schema)  # (N,)

    def cache_inputs(self, splits: Splits, views: np.ndarray | None = None) -> np.ndarray:
        return labelled_then_transfer(self, splits)

    def spec(self, section: TeacherParams | StudentParams, schema: Schema, root: Path | None = None) -> ModelSpec:
        return ModelSpec(section.arch, dict(section.options), schema, self.name, root)

    def init_dir(self, params: Params, root: Path) -> Path | None:
        return None

    def build(self, spec: ModelSpec, x_train: np.ndarray | None, seed: int | None,
              init: Path | None = None) -> KDModel:
        return models.build(spec, x_train, seed)

    def teacher_source(self, source: str, root: Path) -> Path:
        return root / source

    def adopt(self, src: Path, section: TeacherParams, schema: Schema, out: Path) -> KDModel:
        """A weights file for `section.arch` (trained on raw features), or a kd model directory."""
        if src.is_file():
            if src.suffix not in models.CHECKPOINT_SUFFIXES:
                raise UserError(f"teacher {src}: expected a kd model directory or a weights file "
                                f"({', '.join(models.CHECKPOINT_SUFFIXES)})")
            spec = self.spec(section, schema)
            model = models.load_checkpoint(src, spec)
            models.save(model, spec, out)
            return model
        model, spec = models.load(src)
        _check_schema(spec, schema, str(src))
        for file in (models.WEIGHTS_FILE, models.META_FILE):
            shutil.copy2(src / file, out / file)
        return model

    def save(self, model: nn.Module, spec: ModelSpec, out: Path) -> None:
        models.save(model, spec, out)

    def load(self, path: Path) -> tuple[KDModel, ModelSpec]:
        return models.load(path)

    def fingerprint(self, path: Path) -> str:
        return models.fingerprint(path)

    def lengths(self, x: np.ndarray, schema: Schema) -> np.ndarray | None:
        return None

    def batch_order(self, model: nn.Module, x: np.ndarray) -> np.ndarray:
        return np.arange(len(x))  # rows of one width: any order costs the same

    def positions(self, x: np.ndarray) -> int:
        return 1

    def cache_batch(self, model: nn.Module, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(rows)

    def cache_logits(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model(batch)  # (B, F) -> (B, C): one table row is one cache row

    def predict_logits(self, model: nn.Module, x: np.ndarray) -> np.ndarray:
        return models.predict_logits(model, x)

    def serving_inputs(self, model: nn.Module, spec: ModelSpec, frame: pd.DataFrame) -> np.ndarray:
        schema = spec.schema
        missing = [c for c in schema.features if c not in frame.columns]
        if missing:
            raise UserError(f"input lacks feature column(s) {missing[:5]} ({len(missing)} of the "
                            f"{len(schema.features)} the model reads)")
        return self.inputs(frame, schema)  # (N, F): columns by name, any order, extras ignored

    def answer(self, model: nn.Module, spec: ModelSpec, frame: pd.DataFrame, params: dict) -> np.ndarray | pd.DataFrame:
        return classify(self, model, spec, frame, params)

    def input_example(self, model: nn.Module, frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
        """Float columns as double: JSON numbers arrive as float64, and MLflow's schema check refuses
        float64 -> float32 (it does accept float32 -> double)."""
        rows = frame[list(schema.features)].head(5)
        return rows.astype({c: "float64" for c in schema.features if rows[c].dtype.kind == "f"})

    def example(self, spec: ModelSpec, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, len(spec.schema.features))  # (batch, F)


def _check_schema(spec: ModelSpec, schema: Schema, source: str) -> None:
    """A loaded teacher must read the same features and predict the same classes as the data."""
    if spec.schema.features != schema.features:
        raise UserError(f"teacher {source} expects features {list(spec.schema.features)[:5]}…, "
                        f"the prepared data has {list(schema.features)[:5]}…")
    if tuple(map(str, spec.schema.classes)) != tuple(map(str, schema.classes)):
        raise UserError(f"teacher {source} predicts classes {list(spec.schema.classes)}, "
                        f"the training labels are {list(schema.classes)}")
