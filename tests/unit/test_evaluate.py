"""Evaluation metrics: one interleaved latency timer, one calibration binning."""

from __future__ import annotations

import numpy as np
import torch

from kd_core import evaluate


def test_latencies_are_timed_interleaved_round_by_round():
    """The policy's latency ratio compares models timed in alternating blocks, not one after another."""
    calls: list[str] = []
    fns = {name: (lambda n=name: calls.append(n)) for name in ("teacher", "student", "baseline")}
    out = evaluate.interleaved_medians_ms(fns, repeats=6, warmup=3, rounds=3)
    assert set(out) == set(fns) and all(v >= 0 for v in out.values())
    block = 1 + 2  # per round: one warm-up call and two timed calls per model
    rounds = [calls[i:i + 3 * block] for i in range(0, len(calls), 3 * block)]
    assert len(rounds) == 3
    for r in rounds:  # every round visits every model, in the same order
        assert r == ["teacher"] * block + ["student"] * block + ["baseline"] * block


def test_batch1_latencies_run_every_model_on_its_own_example():
    seen = {}

    class Spy(torch.nn.Module):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen[self.name] = tuple(x.shape)
            return x

    out = evaluate.batch1_latencies_ms({"a": Spy("a"), "b": Spy("b")}, {"a": torch.zeros(1, 3), "b": torch.zeros(1, 5)})
    assert set(out) == {"a", "b"} and seen == {"a": (1, 3), "b": (1, 5)}


def test_ece_is_computed_from_the_reliability_bins_the_card_draws():
    rng = np.random.default_rng(0)
    logits, y = rng.normal(size=(500, 4)) * 2, rng.integers(0, 4, 500)
    _, conf, acc, counts = evaluate.reliability_bins(logits, y)
    full = counts > 0
    by_hand = sum(counts[b] / 500 * abs(conf[b] - acc[b]) for b in np.flatnonzero(full))
    assert abs(evaluate.ece(logits, y) - by_hand) < 1e-12
    assert counts.sum() == 500 and len(counts) == evaluate.ECE_BINS


def _probs_as_logits(p: list[list[float]]) -> np.ndarray:
    return np.log(np.asarray(p))  # softmax(log p) = p


def test_ece_matches_hand_computed_values():
    """Five rows worked out on paper (Guo et al. 2017: Σ_b n_b/N · |conf_b - acc_b|), independent of the
    binning helper: at 5 bins two bins hold two rows each; at 15 every row has a bin of its own."""
    logits = _probs_as_logits([[0.95, 0.05], [0.85, 0.15], [0.30, 0.70], [0.45, 0.55], [0.62, 0.38]])
    y = np.array([0, 1, 1, 0, 0])  # right, wrong, right, wrong, right
    # [0.8, 1): conf 0.90, acc 0.5; [0.6, 0.8): conf 0.66, acc 1; [0.4, 0.6): conf 0.55, acc 0
    assert abs(evaluate.ece(logits, y, bins=5) - (2 / 5 * 0.40 + 2 / 5 * 0.34 + 1 / 5 * 0.55)) < 1e-12  # 0.406
    assert abs(evaluate.ece(logits, y) - (0.05 + 0.85 + 0.30 + 0.55 + 0.38) / 5) < 1e-12  # 15 bins: 0.426
    _, conf, acc, counts = evaluate.reliability_bins(logits, y, bins=5)
    assert counts.tolist() == [0, 0, 1, 2, 2]
    np.testing.assert_allclose(conf[2:], [0.55, 0.66, 0.90])
    np.testing.assert_allclose(acc[2:], [0.0, 1.0, 0.5])


def test_ece_extremes():
    confident = np.array([[30.0, 0.0, 0.0]] * 8)  # confidence 1 to float precision
    assert evaluate.ece(confident, np.zeros(8, int)) < 1e-9  # always right: calibrated
    assert abs(evaluate.ece(confident, np.ones(8, int)) - 1.0) < 1e-9  # always wrong: as far off as it gets
    uniform = np.zeros((6, 4))  # confidence 1/4 everywhere, argmax class 0, right on 3 rows in 6
    assert abs(evaluate.ece(uniform, np.array([0, 0, 0, 1, 2, 3])) - 0.25) < 1e-12


def test_ece_matches_an_independent_implementation():
    """A plain loop over bins [m/M, (m+1)/M) (the last closed), on torch's softmax: torchmetrics'
    MulticlassCalibrationError (norm l1) bins the same way."""
    rng = np.random.default_rng(1)
    logits, y = rng.normal(size=(2000, 5)) * 3, rng.integers(0, 5, 2000)
    p = torch.softmax(torch.from_numpy(logits), dim=1)
    conf, right = p.max(1).values.numpy(), (p.argmax(1).numpy() == y)
    for bins in (15, 10, 4):
        want = 0.0
        for m in range(bins):
            lo, hi = m / bins, (m + 1) / bins
            rows = (conf >= lo) & ((conf < hi) if m < bins - 1 else (conf <= hi))
            if rows.any():
                want += rows.mean() * abs(conf[rows].mean() - right[rows].mean())
        assert abs(evaluate.ece(logits, y, bins=bins) - want) < 1e-9, bins
