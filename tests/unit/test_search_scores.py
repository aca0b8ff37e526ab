"""The per-row scores a distill.search candidate is judged by: accuracy and mean NLL over each held-out
row's labelled positions, checked against a direct computation (rows of one position and of several)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kd_core.stages._distil import KDRows
from kd_core.stages.train_student import _held_out_scores


def _rows(x: np.ndarray, y: np.ndarray, positions: int) -> KDRows:
    return KDRows(x, y, positions, len(x), np.arange(0), [], [], None)


@pytest.mark.parametrize("positions", [1, 3])
def test_held_out_scores_are_accuracy_and_nll_per_row(positions: int) -> None:
    rng = np.random.default_rng(0)
    n, classes = 700, 5  # more rows than one scoring pass holds
    logits = rng.normal(size=(n, positions, classes)).astype(np.float32)  # the "model" is a lookup table
    y = rng.integers(0, classes, size=(n, positions)).reshape(n, -1)[:, :positions]
    if positions > 1:
        y[0, 1] = -1  # an unlabelled position is not scored
    y = y.reshape(n) if positions == 1 else y
    task = SimpleNamespace(predict_logits=lambda _m, rows: logits[rows[:, 0]].reshape(-1, classes))
    x = np.arange(n)[:, None]
    held = np.array([0, 3, 5, 699, 698, 10])
    acc, nll = _held_out_scores(task, None, _rows(x, y, positions), held)

    lp = torch.log_softmax(torch.from_numpy(logits[held]), -1).numpy()  # (V, P, C)
    yy = y[held].reshape(len(held), positions)
    for i in range(len(held)):
        keep = yy[i] >= 0
        right = lp[i].argmax(-1)[keep] == yy[i][keep]
        assert acc[i] == pytest.approx(right.mean())
        assert nll[i] == pytest.approx(-lp[i][keep, yy[i][keep]].mean(), rel=1e-5)
