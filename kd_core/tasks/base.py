"""The protocol every task implements: the one place where tables, text and token streams differ.

Model inputs are arrays whose first axis is the row (one cache row each): the training loop, the
cache and the evaluation index them by row and never look inside.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn

from kd_core.config import DataParams, StudentParams, TeacherParams
from kd_core.data import Schema, Splits
from kd_core.models import KDModel, ModelSpec


class Task(Protocol):
    name: str
    headline: str  # the metric the policy and the card lead with ("accuracy", "perplexity")

    def load_source(self, params: DataParams, root: Path) -> Splits:
        """The prepared splits from the configured source; bad input raises one-line UserErrors."""

    def inputs(self, frame: pd.DataFrame, schema: Schema) -> np.ndarray:
        """Model inputs for the rows of one split.  # (N, ...)"""

    def labels(self, frame: pd.DataFrame, schema: Schema) -> np.ndarray:
        """Class indices into `schema.classes`.  # (N,)"""

    def cache_inputs(self, splits: Splits) -> np.ndarray:
        """The rows the teacher caches and the student learns from, in cache order.  # (N, ...)"""

    def spec(self, section: TeacherParams | StudentParams, schema: Schema) -> ModelSpec:
        """The model spec of a teacher or student section for this data."""

    def build(self, spec: ModelSpec, x_train: np.ndarray | None, seed: int | None) -> KDModel:
        """A fresh model (fitted preprocessing where the task has any)."""

    def save(self, model: KDModel, spec: ModelSpec, out: Path) -> None: ...

    def load(self, path: Path) -> tuple[KDModel, ModelSpec]: ...

    def fingerprint(self, path: Path) -> str:
        """Identity of a saved model (weights + config + anything that shapes its inputs)."""

    def cache_logits(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """Model outputs for a batch of cache rows as one logit row per cache row.  # (B, C)"""

    def predict_logits(self, model: nn.Module, x: np.ndarray) -> np.ndarray:
        """Logits for whole-split inputs on the CPU.  # (N, C)"""

    def serving_inputs(self, frame: pd.DataFrame, schema: Schema) -> np.ndarray:
        """Raw inputs as a served model receives them (a table by column name) -> model inputs;
        what is missing is a one-line UserError naming it."""

    def input_example(self, frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
        """A few raw rows in the types a client sends: the served model's signature and example."""

    def example(self, spec: ModelSpec, batch: int = 1) -> torch.Tensor:
        """`batch` zero input rows: for MAC counting and latency (batch 1), shape probes and export."""

    def metrics(self, model: nn.Module, spec: ModelSpec, logits: np.ndarray, y: np.ndarray,
                teacher_pred: np.ndarray, weights_file: Path, latency_ms: float) -> dict:
        """Every contract metric of `metrics/eval.json` for one model on the test rows (`latency_ms`:
        measured with the other models, interleaved: kd_core.evaluate.batch1_latencies_ms)."""
