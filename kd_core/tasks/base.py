"""The protocol every task implements: the one place where tables, text and token streams differ.

Model inputs are arrays whose first axis is the row (one cache row each): the training loop, the
cache and the evaluation index them by row and never look inside.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol, cast

import numpy as np
import pandas as pd
import torch
from torch import nn

from kd_core.config import Params, StudentParams, TeacherParams, ValidationParams
from kd_core.data import Schema, Splits
from kd_core.models import ModelSpec

if TYPE_CHECKING:
    from kd_core.evaluate import Scores
    from kd_core.policy import ChampionScore
    from kd_core.registry import ChampionInputs
    from kd_core.validation import Suite


class Task(Protocol):
    name: str
    outputs: tuple[str, ...]  # what a served model can answer (`params={"output": ...}`); the first by default
    serving_params: dict  # further predict params a served model takes, with their defaults
    headline: str  # the metric the policy and the card lead with ("accuracy", "perplexity")
    lower_is_better: bool  # the headline's direction: the search and the champion comparison ask it
    classifier: bool  # answers with class names and probabilities (predict writes those columns)
    builtin_sources: tuple[str, ...]  # data.source values it ships (the first is the default)
    file_sources: tuple[str, ...]  # data.source values read from data.train / data.test files
    requirements: tuple[str, ...]  # packages a served model needs beyond kd_core's own
    input_name: str  # the exported ONNX graph's input
    views: bool  # draws augmented views of its rows for the cache (`cache.views`, kd_core.tasks.image.views)
    dynamic_axes: tuple[int, ...]  # its axes of any size (batch; sequence for text)

    def prepare(self, params: Params, root: Path, out: Path) -> Splits:
        """Read the configured source and write the prepared splits into `out`; bad input raises
        one-line UserErrors."""

    def check_params(self, params: Params) -> None:
        """Rules of params.yaml only this task has (no ensembles of text teachers, ...): a ValueError
        naming the key, raised while params.yaml is read."""

    def describe_teacher(self, teacher: TeacherParams) -> str:
        """One teacher section as the model card names it."""

    def split_expectations(self, name: str, splits: Splits, params: ValidationParams) -> list:
        """The Great Expectations of one prepared split (`name` in data.SPLITS)."""

    def extra_suites(self, prepared: Path, splits: Splits, params: ValidationParams) -> list[Suite]:
        """Further suites over what prepare wrote beside the splits (`lm`: the documents); [] if none."""

    def write_card(self, params: Params, workdir: Path, out: Path, data_docs: str) -> dict[str, Path]:
        """The model card (markdown, html, figures) of the run in `workdir`, written into `out`."""

    def champion_score(self, inputs: ChampionInputs) -> ChampionScore | None:
        """The candidate checked against eval.json and, when there is a champion, both scored on the same
        test rows (paired); None without a champion."""

    def describe(self, schema: Schema) -> str:
        """What one input row is, for summaries and the model card ("40 numeric features")."""

    def inputs(self, frame: pd.DataFrame, schema: Schema) -> np.ndarray:
        """Model inputs for the rows of one split.  # (N, ...)"""

    def labels(self, frame: pd.DataFrame, schema: Schema) -> np.ndarray:
        """Class indices into `schema.classes`.  # (N,)"""

    def cache_inputs(self, splits: Splits, views: np.ndarray | None = None) -> np.ndarray:
        """The rows the teacher caches and the student learns from, in cache order; with `views` (what
        `draw_views` drew, as the cache stores it) each row holds its rendered views.  # (N, ...)"""

    def for_training(self, model: nn.Module, params: Params) -> nn.Module:
        """`model` set up to train on plain rows (the teacher, the hard-label twin): image adds online
        augmentation (cache.augment, fresh each step) where `cache.augment.online`; others return it as is."""

    def draw_views(self, n_rows: int, views: int, augment: dict) -> np.ndarray:
        """`views` augmented views of each of `n_rows` input rows, drawn by a seeded generator from the
        `cache.augment` recipe: what the cache stores and the student replays.  # (N·V, D) float32"""

    def spec(self, section: TeacherParams | StudentParams, schema: Schema, root: Path | None = None) -> ModelSpec:
        """The model spec of a teacher or student section for this data; an `arch` that is a relative
        directory is the project `root`'s (models.arch_dir)."""

    def init_dir(self, params: Params, root: Path) -> Path | None:
        """Pretrained weights new models start from (text: the teacher's encoder); None: random init."""

    def build(self, spec: ModelSpec, x_train: np.ndarray | None, seed: int | None,
              init: Path | None = None) -> nn.Module:
        """A fresh model (fitted preprocessing where the task has any; weights from `init` where given)."""

    def teacher_source(self, source: str, root: Path) -> Path:
        """A given teacher.source (not `train`, not an MLflow URI) as a local path (`lm`: also a name
        such as `smollm2`, or a directory holding one .gguf file)."""

    def adopt(self, src: Path, section: TeacherParams, schema: Schema, out: Path) -> nn.Module:
        """A given teacher (a model file or directory) checked against the data and saved into `out`."""

    def save(self, model: nn.Module, spec: ModelSpec, out: Path) -> None: ...

    def load(self, path: Path) -> tuple[nn.Module, ModelSpec]: ...

    def fingerprint(self, path: Path) -> str:
        """Identity of a saved model (weights + config + anything that shapes its inputs)."""

    def lengths(self, x: np.ndarray, schema: Schema) -> np.ndarray | None:
        """Real length of each row of padded inputs (text: tokens), for length-grouped batches;
        None when rows have no length.  # (N,)"""

    def batch_order(self, model: nn.Module, x: np.ndarray) -> np.ndarray:
        """The order to run rows `x` through `model` in (text: by length, so batches carry little
        padding); results are put back in row order.  # (N,)"""

    def positions(self, x: np.ndarray) -> int:
        """Cache rows per input row (`lm`: the tokens of a packed sequence; else 1): input row i holds
        cache rows [i·P, (i+1)·P)."""

    def cache_batch(self, model: nn.Module, rows: np.ndarray) -> torch.Tensor:
        """A batch of input rows as the host tensor the teacher reads (text: padding columns cut on
        the host, so the device never has to report a length back).  # (B, ...)"""

    def cache_logits(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        """Model outputs for a batch of input rows as one logit row per cache row.  # (B·P, C)"""

    def predict_logits(self, model: nn.Module, x: np.ndarray) -> np.ndarray:
        """Logits for whole-split inputs on the CPU.  # (N, C)"""

    def serving_inputs(self, model: nn.Module, spec: ModelSpec, frame: pd.DataFrame) -> np.ndarray | list[list[int]]:
        """Raw inputs as a served model receives them (a table by column name, raw text) -> model inputs
        (`lm`: each prompt's token ids, prompts of any length); what is missing is a one-line UserError
        naming it."""

    def answer(self, model: nn.Module, spec: ModelSpec, frame: pd.DataFrame, params: dict) -> np.ndarray | pd.DataFrame:
        """What the served model returns for raw inputs (class names, probabilities, completions);
        `params` as a client sends them (`output`, `max_new_tokens`, ...)."""

    def input_example(self, model: nn.Module, frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
        """A few raw rows in the types a client sends: the served model's signature and example."""

    def client_inputs(self, frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
        """The rows of a prepared split as a client sends them to the served model (text: the documents,
        not the prepared ids; image: encoded images, not the prepared pixels)."""

    def example(self, spec: ModelSpec, batch: int = 1) -> torch.Tensor:
        """`batch` zero input rows: for MAC counting and latency (batch 1), shape probes and export."""

    def score(self, loaded: dict[str, tuple[nn.Module, ModelSpec]], splits: Splits,
              weights: dict[str, Path]) -> dict[str, dict]:
        """Every contract metric of `metrics/eval.json` per model on the test split (one is `teacher`;
        latencies timed interleaved in one process); `weights`: each model's weights file."""

    def metrics(self, model: nn.Module, spec: ModelSpec, scores: Scores, weights_file: Path,
                latency_ms: float) -> dict:
        """Every contract metric of `metrics/eval.json` for one model on the test rows, from its running
        sums over them (`scores`, added batch by batch: memory does not grow with the test split;
        `latency_ms`: measured with the other models, interleaved: kd_core.evaluate.batch1_latencies_ms);
        `lm`: those that next-token sums determine, as its `score` (which adds kl_to_teacher and tokens_per_s)."""


def labelled_then_transfer(task: Task, splits: Splits) -> np.ndarray:
    """Every task's cache row order: the labelled train rows, then the transfer rows.  # (N, ...)"""
    return np.concatenate([task.inputs(splits.train, splits.schema), task.inputs(splits.transfer, splits.schema)])


def classify(task: Task, model: nn.Module, spec: ModelSpec, frame: pd.DataFrame,
             params: dict) -> np.ndarray | pd.DataFrame:
    """A classifier's served answer: class names (N,), or with `output: probabilities` one column per class."""
    from kd_core.errors import UserError

    output = params.get("output", task.outputs[0])
    if output not in task.outputs:
        raise UserError(f"unknown output {output!r}; choose one of {list(task.outputs)}")
    x = task.serving_inputs(model, spec, frame)
    assert isinstance(x, np.ndarray), "a classifier's serving inputs are one array"
    logits = task.predict_logits(model, x)
    logits = logits.reshape(len(frame), len(spec.schema.classes))  # (N, K), also when N == 0
    if output == "probabilities":
        probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()  # (N, K)
        return pd.DataFrame(probs, columns=[str(c) for c in spec.schema.classes])
    return np.asarray(spec.schema.classes, dtype=object)[logits.argmax(axis=1)]  # (N,) class names


class Classifier:
    """What every task whose rows carry one class label shares (tables, documents): accuracy first, the
    generic validation suite and model card, and the champion re-scored through its served model."""

    outputs: tuple[str, ...] = ("classes", "probabilities")
    serving_params: dict = {}
    headline = "accuracy"
    lower_is_better = False
    classifier = True
    views = False

    def check_params(self, params: Params) -> None:
        return None

    def draw_views(self, n_rows: int, views: int, augment: dict) -> np.ndarray:
        raise NotImplementedError(f"task {cast(Task, self).name} draws no augmented views")

    def for_training(self, model: nn.Module, params: Params) -> nn.Module:
        return model

    def client_inputs(self, frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
        return frame[list(schema.features)]  # the feature columns, or the text column, as they were read

    def describe_teacher(self, teacher: TeacherParams) -> str:
        return f"{teacher.arch} {dict(teacher.options)} (source: {teacher.source}, {teacher.epochs} epochs)"

    def split_expectations(self, name: str, splits: Splits, params: ValidationParams) -> list:
        from kd_core.validation import split_expectations

        return split_expectations(name, splits, params)

    def extra_suites(self, prepared: Path, splits: Splits, params: ValidationParams) -> list[Suite]:
        return []

    def write_card(self, params: Params, workdir: Path, out: Path, data_docs: str) -> dict[str, Path]:
        from kd_core.card.gather import classifier_card

        return classifier_card(params, workdir, out, data_docs)

    def champion_score(self, inputs: ChampionInputs) -> ChampionScore | None:
        from kd_core.registry import served_champion

        return served_champion(inputs)

    def score(self, loaded: dict[str, tuple[nn.Module, ModelSpec]], splits: Splits,
              weights: dict[str, Path]) -> dict[str, dict]:
        from kd_core import evaluate

        task = cast(Task, self)
        return evaluate.classifier_scores(task, loaded, task.inputs(splits.test, splits.schema),
                                          task.labels(splits.test, splits.schema), weights)

    def metrics(self, model: nn.Module, spec: ModelSpec, scores: Scores, weights_file: Path,
                latency_ms: float) -> dict:
        from kd_core import evaluate

        return evaluate.model_metrics(model, cast(Task, self).example(spec), scores, spec.schema.classes,
                                      weights_file, latency_ms)
