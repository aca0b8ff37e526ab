"""Evaluation metrics for teacher, student and baseline, under the key names of the output contract.

The same keys are used in eval.json, MLflow and the promotion policy, so nothing has to translate.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
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


def nll(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (natural log)."""
    z = logits - logits.max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


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


def per_class_accuracy(logits: np.ndarray, y: np.ndarray, classes: tuple) -> dict[str, float]:
    pred = logits.argmax(1)
    return {str(c): float((pred[y == i] == i).mean()) for i, c in enumerate(classes) if (y == i).any()}


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


def model_metrics(model: nn.Module, example: torch.Tensor, logits: np.ndarray, y: np.ndarray,
                  teacher_pred: np.ndarray, classes: tuple, weights_file: Path, latency_ms: float) -> dict:
    """Every contract metric for one model on the test rows."""
    return {
        "accuracy": accuracy(logits, y),
        "ece": ece(logits, y),
        "nll": nll(logits, y),
        "agreement_with_teacher": float((logits.argmax(1) == teacher_pred).mean()),
        "params": count_params(model),
        "macs": count_macs(model, example),
        "latency_ms_p50": latency_ms,
        "size_bytes": weights_file.stat().st_size,
        "per_class_accuracy": per_class_accuracy(logits, y, classes),
    }


def classifier_scores(task: Task, loaded: dict[str, tuple[nn.Module, ModelSpec]], x: np.ndarray, y: np.ndarray,
                      weights: dict[str, Path]) -> dict[str, dict]:
    """`tabular` and `text`: every model's contract metrics on the test rows `x`, labels `y`; one
    model is `teacher` (the agreement reference: with several teachers, their ensemble)."""
    logits = {r: task.predict_logits(m, x) for r, (m, _) in loaded.items()}
    latency = batch1_latencies_ms({r: m for r, (m, _) in loaded.items()},
                                  {r: task.example(spec) for r, (_, spec) in loaded.items()})
    teacher_pred = logits["teacher"].argmax(1)
    return {r: task.metrics(m, spec, logits[r], y, teacher_pred, weights[r], latency[r])
            for r, (m, spec) in loaded.items()}
