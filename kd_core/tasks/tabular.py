"""`task: tabular` — a row is a vector of numeric features; models are kd_core architectures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from kd_core import data, evaluate, models
from kd_core.config import DataParams, StudentParams, TeacherParams
from kd_core.data import Schema, Splits
from kd_core.errors import UserError
from kd_core.models import KDModel, ModelSpec


class TabularTask:
    name = "tabular"
    headline = "accuracy"

    def load_source(self, params: DataParams, root: Path) -> Splits:
        return data.load_source(params, root)

    def inputs(self, frame: pd.DataFrame, schema: Schema) -> np.ndarray:
        return data.features_array(frame, schema)  # (N, F) float32

    def labels(self, frame: pd.DataFrame, schema: Schema) -> np.ndarray:
        return data.label_indices(frame, schema)  # (N,)

    def cache_inputs(self, splits: Splits) -> np.ndarray:
        """Labelled train rows, then transfer rows: the cache's row order.  # (N, F)"""
        return np.concatenate([self.inputs(splits.train, splits.schema),
                               self.inputs(splits.transfer, splits.schema)])

    def spec(self, section: TeacherParams | StudentParams, schema: Schema) -> ModelSpec:
        return ModelSpec(section.arch, dict(section.options), schema, self.name)

    def build(self, spec: ModelSpec, x_train: np.ndarray | None, seed: int | None) -> KDModel:
        return models.build(spec, x_train, seed)

    def save(self, model: KDModel, spec: ModelSpec, out: Path) -> None:
        models.save(model, spec, out)

    def load(self, path: Path) -> tuple[KDModel, ModelSpec]:
        return models.load(path)

    def fingerprint(self, path: Path) -> str:
        return models.fingerprint(path)

    def cache_logits(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model(batch)  # (B, F) -> (B, C): one table row is one cache row

    def predict_logits(self, model: nn.Module, x: np.ndarray) -> np.ndarray:
        return models.predict_logits(model, x)

    def serving_inputs(self, frame: pd.DataFrame, schema: Schema) -> np.ndarray:
        missing = [c for c in schema.features if c not in frame.columns]
        if missing:
            raise UserError(f"input lacks feature column(s) {missing[:5]} ({len(missing)} of the "
                            f"{len(schema.features)} the model reads)")
        return self.inputs(frame, schema)  # (N, F): columns by name, any order, extras ignored

    def input_example(self, frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
        """Float columns as double: JSON numbers arrive as float64, and MLflow's schema check refuses
        float64 -> float32 (it does accept float32 -> double)."""
        rows = frame[list(schema.features)].head(5)
        return rows.astype({c: "float64" for c in schema.features if rows[c].dtype.kind == "f"})

    def example(self, spec: ModelSpec, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, len(spec.schema.features))  # (batch, F)

    def metrics(self, model: nn.Module, spec: ModelSpec, logits: np.ndarray, y: np.ndarray,
                teacher_pred: np.ndarray, weights_file: Path, latency_ms: float) -> dict:
        return evaluate.model_metrics(model, self.example(spec), logits, y, teacher_pred, spec.schema.classes,
                                      weights_file, latency_ms)
