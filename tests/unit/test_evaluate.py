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
