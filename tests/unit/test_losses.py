"""KD losses against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from kd_core.losses import UNLABELLED, hard_ce, hinton_kd, soft_kl


def _kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def _softmax(z: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def test_soft_kl_matches_hand_computation_with_t_squared():
    s, t, T = [1.0, 0.0, -1.0], [2.0, 0.5, 0.0], 2.0
    expected = T**2 * _kl(_softmax(t, T), _softmax(s, T))
    got = soft_kl(torch.tensor([s]), torch.tensor([t]), T)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_t_squared_keeps_soft_gradient_scale():
    """Without T², the soft gradient shrinks ~1/T²; with it, the scale stays of the same order."""
    torch.manual_seed(0)
    s0, t = torch.randn(64, 10), torch.randn(64, 10) * 3
    norms = []
    for T in (2.0, 8.0):
        s = s0.clone().requires_grad_(True)
        soft_kl(s, t, T).mean().backward()
        norms.append(s.grad.norm().item())
    assert 0.2 < norms[1] / norms[0] < 5  # 1/T² alone would give 1/16


def test_hinton_kd_mixes_labelled_and_soft_only_rows():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[0.0, 2.0], [3.0, 0.0]])
    y = torch.tensor([1, UNLABELLED])
    T, alpha = 3.0, 0.7
    soft = soft_kl(s, t, T)
    ce0 = F.cross_entropy(s[:1], y[:1]).item()
    expected = ((alpha * soft[0].item() + (1 - alpha) * ce0) + soft[1].item()) / 2
    assert hinton_kd(s, t, y, T, alpha).item() == pytest.approx(expected, rel=1e-6)


def test_alpha_zero_is_plain_cross_entropy_on_labelled_rows():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 1])
    assert hinton_kd(s, t, y, 4.0, 0.0).item() == pytest.approx(F.cross_entropy(s, y).item(), rel=1e-6)


def test_hard_ce_ignores_unlabelled_rows():
    s = torch.tensor([[2.0, 0.0], [0.0, 9.0]])
    y = torch.tensor([0, UNLABELLED])
    assert hard_ce(s, y).item() == pytest.approx(F.cross_entropy(s[:1], y[:1]).item())
