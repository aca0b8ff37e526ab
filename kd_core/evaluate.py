"""Evaluation metrics for teacher, student and baseline, under the key names of the output contract.

The same keys are used in eval.json, MLflow and the promotion policy, so nothing has to translate.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

if TYPE_CHECKING:
    from kd_core.models import ModelSpec
    from kd_core.tasks.base import Task


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean()) if len(y) else 0.0


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


ECE_BINS = 15  # Guo et al. 2017's choice; the model card's reliability diagrams use the same bins


def reliability_bins(logits: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> tuple[np.ndarray, ...]:
    """Per equal-width confidence bin: edges, mean confidence, accuracy and row count (NaN where
    empty). The one binning behind both eval.json's ECE and the model card's reliability diagram."""
    p = softmax(logits)
    conf, pred = p.max(1), p.argmax(1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore"):
        mean_conf = np.bincount(which, conf, bins) / counts
        acc = np.bincount(which, (pred == y).astype(float), bins) / counts
    return edges, mean_conf, acc, counts


def ece(logits: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: |confidence - accuracy| averaged over equal-width confidence bins
    weighted by their share of rows (Guo et al. 2017, 15 bins)."""
    _, mean_conf, acc, counts = reliability_bins(logits, y, bins)
    full = counts > 0
    return float((counts[full] / max(len(y), 1) * np.abs(mean_conf[full] - acc[full])).sum())


@dataclass
class Scores:
    """One model's test metrics as running sums, added a batch of rows at a time: O(K + bins) memory
    where the whole split's logits are O(N·K) (lm: 4,096 tokens x 49,152 classes is 805 MB of float32).
    Each batch is scored exactly as the whole-split functions above score their rows (same dtype, the
    same argmax of logits for accuracy and of probabilities for the bins); only the order of the float
    sums differs."""

    classes: int
    bins: int = ECE_BINS
    rows: int = 0
    correct: int = 0  # top-1 == label
    agree: int = 0  # top-1 == the teacher's top-1
    nll: float = 0.0  # summed -log p(label)
    bin_rows: np.ndarray = field(init=False)  # (bins,) rows per confidence bin
    bin_conf: np.ndarray = field(init=False)  # (bins,) summed confidence
    bin_correct: np.ndarray = field(init=False)  # (bins,) rows whose most probable class is the label
    class_rows: np.ndarray = field(init=False)  # (K,) rows per true class
    class_correct: np.ndarray = field(init=False)  # (K,) of them predicted right

    def __post_init__(self) -> None:
        self.bin_rows, self.bin_conf, self.bin_correct = (np.zeros(self.bins) for _ in range(3))
        self.class_rows, self.class_correct = np.zeros(self.classes, np.int64), np.zeros(self.classes, np.int64)

    def add(self, logits: np.ndarray, y: np.ndarray, teacher_pred: np.ndarray) -> None:
        """One batch: logits (n, K), labels (n,), the teacher's top-1 (n,)."""
        pred = logits.argmax(1)
        hit = pred == y
        self.rows, self.correct = self.rows + len(y), self.correct + int(hit.sum())
        self.agree += int((pred == teacher_pred).sum())
        self.nll += float(-_log_softmax(logits)[np.arange(len(y)), y].astype(np.float64).sum())
        p = softmax(logits)
        conf = p.max(1)
        which = np.clip(np.digitize(conf, np.linspace(0.0, 1.0, self.bins + 1)[1:-1]), 0, self.bins - 1)
        self.bin_rows += np.bincount(which, minlength=self.bins)
        self.bin_conf += np.bincount(which, conf, self.bins)
        self.bin_correct += np.bincount(which, (p.argmax(1) == y).astype(float), self.bins)
        self.class_rows += np.bincount(y, minlength=self.classes)[:self.classes]
        self.class_correct += np.bincount(y[hit], minlength=self.classes)[:self.classes]

    @property
    def accuracy(self) -> float:
        return self.correct / self.rows if self.rows else 0.0

    @property
    def nll_mean(self) -> float:
        return self.nll / self.rows if self.rows else float("nan")

    @property
    def ece(self) -> float:
        """As `ece` of the whole split: the bins' |confidence - accuracy| weighted by their share of rows."""
        full = self.bin_rows > 0
        gap = np.abs(self.bin_conf[full] - self.bin_correct[full]) / self.bin_rows[full]
        return float((self.bin_rows[full] / max(self.rows, 1) * gap).sum())

    def per_class_accuracy(self, classes: tuple) -> dict[str, float]:
        return {str(c): float(self.class_correct[i] / self.class_rows[i])
                for i, c in enumerate(classes) if self.class_rows[i]}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates for one example (`example`: a batch of one): FLOPs / 2 as FlopCounterMode counts them."""
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model.eval()(example)
    return int(counter.get_total_flops() // 2)


REPEATS, WARMUP = 300, 30  # batch-1 calls timed per model (and untimed warm-up calls)


def interleaved_medians_ms(fns: dict[str, Callable[[], object]], repeats: int = REPEATS, warmup: int = WARMUP,
                           rounds: int = 10) -> dict[str, float]:
    """Median wall time of each callable. The calls run in `rounds` blocks per callable, round-robin:
    machine noise hits every variant alike, and within a block each one stays warm (call by call
    interleaving would charge each one for the other's cold caches and sleeping threads)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    per_round, warm = max(1, repeats // rounds), max(1, warmup // rounds)
    for _ in range(rounds):
        for name, fn in fns.items():
            for i in range(warm + per_round):
                t0 = time.perf_counter()
                fn()
                if i >= warm:
                    times[name].append((time.perf_counter() - t0) * 1000)
    return {k: float(statistics.median(v)) for k, v in times.items()}


def batch1_latencies_ms(models: dict[str, nn.Module], examples: dict[str, torch.Tensor]) -> dict[str, float]:
    """Median batch-1 CPU forward time of every model, timed interleaved in one process, so the
    policy's latency ratio compares models that saw the same machine noise."""
    calls: dict[str, Callable[[], object]] = {}
    for name, model in models.items():
        model.eval()
        calls[name] = functools.partial(model, examples[name])
    with torch.inference_mode():
        return interleaved_medians_ms(calls)


def model_metrics(model: nn.Module, example: torch.Tensor, scores: Scores, classes: tuple, weights_file: Path,
                  latency_ms: float) -> dict:
    """Every contract metric for one model on the test rows, from its running sums."""
    return {
        "accuracy": scores.accuracy,
        "ece": scores.ece,
        "nll": scores.nll_mean,
        "agreement_with_teacher": scores.agree / max(scores.rows, 1),
        "params": count_params(model),
        "macs": count_macs(model, example),
        "latency_ms_p50": latency_ms,
        "size_bytes": weights_file.stat().st_size,
        "per_class_accuracy": scores.per_class_accuracy(classes),
    }


CHUNK_ROWS = 4096  # test rows scored at a time: every model's logits for them are (4096, K), whatever N is


def classifier_scores(task: Task, loaded: dict[str, tuple[nn.Module, ModelSpec]], x: np.ndarray, y: np.ndarray,
                      weights: dict[str, Path]) -> dict[str, dict]:
    """`tabular`, `text` and `image`: every model's contract metrics on the test rows `x`, labels `y`; one
    model is `teacher` (the agreement reference: with several teachers, their ensemble). The rows are
    scored CHUNK_ROWS at a time into running sums, so memory does not grow with the test split."""
    scores = {r: Scores(len(spec.schema.classes)) for r, (_, spec) in loaded.items()}
    per, y = task.positions(x), y.reshape(-1)  # one label per logit row
    for i in range(0, len(x), CHUNK_ROWS):
        rows, labels = x[i:i + CHUNK_ROWS], y[i * per:(i + CHUNK_ROWS) * per]
        teacher = task.predict_logits(loaded["teacher"][0], rows)  # (n, K)
        teacher_pred = teacher.argmax(1)
        for r, (m, _) in loaded.items():
            scores[r].add(teacher if r == "teacher" else task.predict_logits(m, rows), labels, teacher_pred)
    latency = batch1_latencies_ms({r: m for r, (m, _) in loaded.items()},
                                  {r: task.example(spec) for r, (_, spec) in loaded.items()})
    return {r: task.metrics(m, spec, scores[r], weights[r], latency[r]) for r, (m, spec) in loaded.items()}
