"""Evaluation metrics for teacher, student and baseline, under the key names of the output contract.

The same keys are used in eval.json, MLflow and the promotion policy, so nothing has to translate.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


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


def ece(logits: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: |confidence - accuracy| averaged over equal-width confidence bins
    weighted by their share of rows (Guo et al. 2017, 15 bins)."""
    p = softmax(logits)
    conf, pred = p.max(1), p.argmax(1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    err = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            err += m.mean() * abs(conf[m].mean() - (pred[m] == y[m]).mean())
    return float(err)


def per_class_accuracy(logits: np.ndarray, y: np.ndarray, classes: tuple) -> dict[str, float]:
    pred = logits.argmax(1)
    return {str(c): float((pred[y == i] == i).mean()) for i, c in enumerate(classes) if (y == i).any()}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, n_features: int) -> int:
    """Multiply-accumulates for one example: FLOPs / 2 as FlopCounterMode counts them."""
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model.eval()(torch.zeros(1, n_features))
    return int(counter.get_total_flops() // 2)


def latency_ms_p50(model: nn.Module, n_features: int, repeats: int = 300, warmup: int = 30) -> float:
    """Median batch-1 CPU forward time. Measured for all models in one process so noise is shared."""
    x = torch.randn(1, n_features)
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            model(x)
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1000)
    return float(statistics.median(times))


def model_metrics(model: nn.Module, n_features: int, logits: np.ndarray, y: np.ndarray,
                  teacher_pred: np.ndarray, classes: tuple, weights_file: Path) -> dict:
    """Every contract metric for one model on the test rows."""
    return {
        "accuracy": accuracy(logits, y),
        "ece": ece(logits, y),
        "nll": nll(logits, y),
        "agreement_with_teacher": float((logits.argmax(1) == teacher_pred).mean()),
        "params": count_params(model),
        "macs": count_macs(model, n_features),
        "latency_ms_p50": latency_ms_p50(model, n_features),
        "size_bytes": weights_file.stat().st_size,
        "per_class_accuracy": per_class_accuracy(logits, y, classes),
    }
