"""KD losses against hand computations, and the registry `distill.loss` picks from."""

import math

import pytest
import torch
import torch.nn.functional as F

from kd_core.config import LOSS_NAMES, DistillParams, parse_params
from kd_core.errors import UserError
from kd_core.losses import LOSSES, UNLABELLED, build, dkd, dkd_terms, hard_ce, hinton_kd, logit_mse, mse_kd, soft_kl


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
    got = hinton_kd(s, t, y, T, alpha)
    assert got.shape == (2,)  # per row: the training loop does the reduction
    assert got[0].item() == pytest.approx(alpha * soft[0].item() + (1 - alpha) * ce0, rel=1e-6)
    assert got[1].item() == pytest.approx(soft[1].item(), rel=1e-6)


def test_alpha_zero_is_plain_cross_entropy_on_labelled_rows():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 1])
    torch.testing.assert_close(hinton_kd(s, t, y, 4.0, 0.0), F.cross_entropy(s, y, reduction="none"))


def test_hard_ce_is_zero_on_unlabelled_rows():
    s = torch.tensor([[2.0, 0.0], [0.0, 9.0]])
    y = torch.tensor([0, UNLABELLED])
    got = hard_ce(s, y)
    assert got[0].item() == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-6) and got[1].item() == 0.0


def test_logit_mse_matches_hand_computation():
    s, t = [1.0, -2.0, 0.5], [3.0, 0.0, 0.5]
    expected = ((1 - 3) ** 2 + (-2 - 0) ** 2 + 0) / 3
    assert logit_mse(torch.tensor([s]), torch.tensor([t])).item() == pytest.approx(expected)


def test_mse_is_kd_at_high_temperature():
    """Hinton et al. §2.1: for zero-mean logits, T²·KL → mean((s - t)²) / 2 as T → ∞."""
    torch.manual_seed(0)
    s, t = torch.randn(8, 5), torch.randn(8, 5)
    s, t = s - s.mean(-1, keepdim=True), t - t.mean(-1, keepdim=True)
    errors = [((soft_kl(s, t, T) / (logit_mse(s, t) / 2)) - 1).abs().max().item() for T in (5.0, 10.0, 50.0)]
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.02  # O(1/T), down to float32's precision


def test_mse_kd_mixes_like_hinton():
    s, t, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.tensor([[0.0, 1.0], [1.0, 1.0]]), torch.tensor([0, -1])
    ce0 = F.cross_entropy(s[:1], y[:1]).item()
    got = mse_kd(s, t, y, 0.25)
    assert got[0].item() == pytest.approx(0.25 * 1.0 + 0.75 * ce0, rel=1e-6)  # mse row 0: (1 + 1) / 2
    assert got[1].item() == pytest.approx(1.0, rel=1e-6)  # ((0 - 1)² + (2 - 1)²) / 2, soft only


def test_dkd_terms_match_hand_computation():
    s, t, c, T = [2.0, 0.5, -1.0, 0.0], [1.0, 3.0, 0.0, -0.5], 1, 2.0
    p_s, p_t = _softmax(s, T), _softmax(t, T)
    tckd = _kl([p_t[c], 1 - p_t[c]], [p_s[c], 1 - p_s[c]])
    hat_s = [p / (1 - p_s[c]) for k, p in enumerate(p_s) if k != c]
    hat_t = [p / (1 - p_t[c]) for k, p in enumerate(p_t) if k != c]
    got_t, got_n = dkd_terms(torch.tensor([s]), torch.tensor([t]), torch.tensor([c]), T)
    assert got_t.item() == pytest.approx(tckd, rel=1e-5)
    assert got_n.item() == pytest.approx(_kl(hat_t, hat_s), rel=1e-5)


def test_dkd_terms_recompose_hinton_kl():
    """Zhao et al. eq. 7: KL = TCKD + (1 - p_t[c]) · NCKD, whatever the target class."""
    torch.manual_seed(2)
    s, t, c, T = torch.randn(16, 7) * 2, torch.randn(16, 7) * 3, torch.randint(0, 7, (16,)), 1.5
    tckd, nckd = dkd_terms(s, t, c, T)
    p_t_target = F.softmax(t / T, dim=-1).gather(-1, c[:, None])[:, 0]
    torch.testing.assert_close(T**2 * (tckd + (1 - p_t_target) * nckd), soft_kl(s, t, T), rtol=1e-4, atol=1e-5)


def test_dkd_targets_the_label_or_else_the_teachers_class():
    s, t = torch.tensor([[0.5, 1.0, -1.0], [0.0, 0.3, 2.0]]), torch.tensor([[2.0, 0.0, 1.0], [0.0, 4.0, 1.0]])
    y, T, a, b, alpha = torch.tensor([2, UNLABELLED]), 2.0, 0.5, 3.0, 0.8
    tckd, nckd = dkd_terms(s, t, torch.tensor([2, 1]), T)  # row 1: the teacher's argmax is class 1
    soft = T**2 * (a * tckd + b * nckd)
    ce0 = F.cross_entropy(s[:1], y[:1]).item()
    got = dkd(s, t, y, T, alpha, a, b)
    assert got[0].item() == pytest.approx(alpha * soft[0].item() + (1 - alpha) * ce0, rel=1e-6)
    assert got[1].item() == pytest.approx(soft[1].item(), rel=1e-6)


def test_dkd_gradients_are_finite_for_a_certain_teacher():
    s = torch.randn(4, 6, requires_grad=True)
    t = torch.tensor([[60.0, 0, 0, 0, 0, 0]] * 4)  # p_t[c] = 1 in float32: log(1 - p) relies on log-sum-exp
    dkd(s, t, torch.tensor([0, 0, UNLABELLED, UNLABELLED]), 1.0, 0.9, 1.0, 8.0).sum().backward()
    assert torch.isfinite(s.grad).all()


def test_registry_knows_what_the_params_accept():
    assert tuple(LOSSES.names()) == LOSS_NAMES


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_every_loss_builds_from_params_and_returns_one_value_per_row(name):
    fn = build(DistillParams(loss=name))
    s = torch.randn(5, 4, requires_grad=True)
    out = fn(s, torch.randn(5, 4), torch.tensor([0, 3, UNLABELLED, 1, UNLABELLED]))
    assert out.shape == (5,) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(s.grad).all()


def test_registry_passes_the_params_through():
    s, t, y = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([1, UNLABELLED, 0])
    d = DistillParams(loss="dkd", temperature=3.0, alpha=0.6, dkd_alpha=0.5, dkd_beta=2.0)
    torch.testing.assert_close(build(d)(s, t, y), dkd(s, t, y, 3.0, 0.6, 0.5, 2.0))


def test_unknown_loss_is_a_params_error():
    with pytest.raises(UserError, match="distill.loss: .*unknown loss 'hintn'"):
        parse_params({"distill": {"loss": "hintn"}})
