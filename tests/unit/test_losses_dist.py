"""DIST (Huang et al. 2022): correlation matching, per-row shape, guards and the registry."""

import pytest
import torch
import torch.nn.functional as F

from kd_core.config import DistillParams
from kd_core.losses import UNLABELLED, _mix, build, dist_kd, dist_terms, pearson, soft_kl


def _soft(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The soft term alone: every row unlabelled, β = γ = 1.  # (B,)"""
    y = torch.full((s.shape[0],), UNLABELLED)
    return dist_kd(s, t, y, temperature, alpha=0.9, beta=1.0, gamma=1.0)


_G = torch.Generator().manual_seed(0)  # the parametrized cases' draws, fixed


def test_pearson_matches_a_hand_computation():
    a, b = torch.tensor([[1.0, 2.0, 4.0]]), torch.tensor([[2.0, 1.0, 3.0]])
    ac, bc = [-4 / 3, -1 / 3, 5 / 3], [0.0, -1.0, 1.0]
    expected = sum(x * y for x, y in zip(ac, bc, strict=True)) / (
        sum(x * x for x in ac) ** 0.5 * sum(y * y for y in bc) ** 0.5)
    assert pearson(a, b, dim=-1).item() == pytest.approx(expected, rel=1e-5)


def test_identical_student_and_teacher_score_zero():
    torch.manual_seed(0)
    t = torch.randn(16, 10) * 2
    for temperature in (1.0, 4.0):
        out = _soft(t.clone(), t, temperature)
        assert out.shape == (16,)
        assert out.abs().max().item() < 1e-4


def test_positive_affine_map_of_teacher_probabilities_scores_zero_while_kl_does_not():
    """Pearson ignores scale and shift: a student whose probabilities are a·p_t + b (a > 0) is perfect."""
    torch.manual_seed(1)
    t = torch.randn(32, 6) * 2
    p_t = F.softmax(t, dim=-1)
    p_s = 0.5 * p_t + 0.5 / 6  # (B, K) still a distribution: halfway to uniform
    s = p_s.log()  # logits whose softmax is p_s
    assert _soft(s, t).abs().max().item() < 1e-4
    assert soft_kl(s, t, 1.0).mean().item() > 0.05


def test_permuted_or_anticorrelated_student_scores_high():
    torch.manual_seed(2)
    t = torch.randn(32, 8) * 3
    anti = _soft(-t, t).mean().item()
    permuted = _soft(t[:, torch.randperm(8)], t).mean().item()
    assert anti > 2.0  # both correlations negative: each term near 2 at most
    assert permuted > 0.5
    assert anti > permuted > _soft(t + 0.1 * torch.randn_like(t), t).mean().item()


def test_intra_term_is_one_batch_value_carried_by_every_row():
    torch.manual_seed(3)
    s, t = torch.randn(12, 5), torch.randn(12, 5)
    inter, intra = dist_terms(s, t, 2.0)
    assert inter.shape == (12,) and intra.shape == ()
    out = dist_kd(s, t, torch.full((12,), UNLABELLED), 2.0, 0.9, 0.0, 1.0)  # γ alone
    torch.testing.assert_close(out, torch.full((12,), 4.0 * intra.item()))  # T² · intra on every row
    assert out.mean().item() == pytest.approx(4.0 * intra.item(), rel=1e-6)


@pytest.mark.parametrize(("student", "teacher"), [
    (torch.randn(1, 7, generator=_G), torch.randn(1, 7, generator=_G)),  # one row: no correlation across rows
    (torch.zeros(6, 7), torch.zeros(6, 7)),  # constant logits: uniform rows, no variance anywhere
    (torch.zeros(6, 7), torch.randn(6, 7, generator=_G)),  # a constant student against a real teacher
    (torch.randn(1, 7, generator=_G).repeat(6, 1), torch.randn(1, 7, generator=_G).repeat(6, 1)),  # rows alike
    (torch.randn(6, 7, generator=_G).bfloat16(), torch.randn(6, 7, generator=_G).bfloat16()),  # computed in float32
])
def test_per_row_and_finite_with_finite_gradients(student, teacher):
    s = student.clone().requires_grad_(True)
    y = torch.tensor([2] + [UNLABELLED] * (s.shape[0] - 1))
    out = dist_kd(s, teacher, y, 2.0, 0.9, 1.0, 1.0)
    assert out.shape == (s.shape[0],) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad.float()).all()


def test_one_row_uses_the_inter_term_alone():
    t = torch.randn(1, 5)
    inter, intra = dist_terms(t.clone(), t, 1.0)
    assert intra.item() == 0.0 and inter.abs().item() < 1e-5


def test_gradient_reaches_the_student_logits():
    torch.manual_seed(4)
    s = torch.randn(8, 5, requires_grad=True)
    _soft(s, torch.randn(8, 5)).sum().backward()
    assert s.grad is not None and s.grad.abs().sum().item() > 0


def test_labelled_and_unlabelled_rows_mix_as_mix_does():
    torch.manual_seed(5)
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    y = torch.tensor([1, UNLABELLED, 0, UNLABELLED])
    temperature, alpha, beta, gamma = 2.0, 0.7, 0.5, 2.0
    inter, intra = dist_terms(s, t, temperature)
    soft = temperature**2 * (beta * inter + gamma * intra)  # (B,)
    got = dist_kd(s, t, y, temperature, alpha, beta, gamma)
    torch.testing.assert_close(got, _mix(soft, s, y, alpha))
    ce0 = F.cross_entropy(s[:1], y[:1]).item()
    assert got[0].item() == pytest.approx(alpha * soft[0].item() + (1 - alpha) * ce0, rel=1e-5)
    assert got[1].item() == pytest.approx(soft[1].item(), rel=1e-6)


def test_registry_builds_dist_with_the_params():
    s, t, y = torch.randn(5, 4), torch.randn(5, 4), torch.tensor([1, UNLABELLED, 0, 3, UNLABELLED])
    d = DistillParams(loss="dist", temperature=3.0, alpha=0.6, dist_beta=0.5, dist_gamma=2.0)
    torch.testing.assert_close(build(d)(s, t, y), dist_kd(s, t, y, 3.0, 0.6, 0.5, 2.0))
    torch.testing.assert_close(build(d, top_k=2)(s, t, y), dist_kd(s, t, y, 3.0, 0.6, 0.5, 2.0))  # dense view


def test_weights_must_not_be_negative():
    with pytest.raises(ValueError):
        DistillParams(loss="dist", dist_gamma=-1.0)


def test_optimising_dist_makes_the_student_agree_with_the_teacher():
    torch.manual_seed(6)
    t = torch.randn(64, 10) * 3
    s = torch.randn(64, 10, requires_grad=True)
    opt = torch.optim.Adam([s], lr=0.05)
    y = torch.full((64,), UNLABELLED)
    for _ in range(300):
        loss = dist_kd(s, t, y, 1.0, 0.9, 1.0, 1.0).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    assert (s.argmax(dim=-1) == t.argmax(dim=-1)).float().mean().item() >= 0.95
