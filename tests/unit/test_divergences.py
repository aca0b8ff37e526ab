"""Divergences on the sparse cache's K'+1 buckets, each against a hand computation on tiny tensors."""

import math

import pytest
import torch

from kd_core.cache import TopKTensors
from kd_core.config import DistillParams
from kd_core.divergences import sparse_divergence
from kd_core.losses import build, reads_topk

T_LOGITS = [2.0, 1.0, 0.0, -1.0, -3.0]
S_LOGITS = [0.5, 1.5, 0.2, -0.5, -1.0]


def softmax(z, t=1.0):
    e = [math.exp(v / t) for v in z]
    return [v / sum(e) for v in e]


def kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def buckets(z, keep, t=1.0):
    """Probabilities of the kept classes and of one bucket for the rest, at temperature t."""
    p = softmax(z, t)
    return [p[i] for i in keep] + [sum(p[i] for i in range(len(z)) if i not in keep)]


def topk(z, k):
    """The cache's view of logits z: top-k values, indices, the tail's log-sum-exp at T = 1."""
    zt = torch.tensor([z])
    v, i = zt.topk(k)
    rest = zt.scatter(-1, i, float("-inf"))
    return TopKTensors(v, i, torch.logsumexp(rest, -1), len(z) - k)


def run(name, teacher, t=1.0, **kw):
    return float(sparse_divergence(torch.tensor([S_LOGITS]), teacher, name, t, **kw)[0])


def test_forward_and_reverse_kl_dense():
    p, q = softmax(T_LOGITS), softmax(S_LOGITS)
    assert run("hinton", torch.tensor([T_LOGITS])) == pytest.approx(kl(p, q), rel=1e-5)
    assert run("reverse_kl", torch.tensor([T_LOGITS])) == pytest.approx(kl(q, p), rel=1e-5)


def test_topk_buckets_match_the_hand_computation_at_t1():
    """Top-2 + the tail's exact mass: both sides compared on 3 buckets."""
    keep = [0, 1]
    p, q = buckets(T_LOGITS, keep), buckets(S_LOGITS, keep)
    teacher = topk(T_LOGITS, 2)
    assert run("hinton", teacher) == pytest.approx(kl(p, q), rel=1e-5)
    assert run("reverse_kl", teacher) == pytest.approx(kl(q, p), rel=1e-5)
    m = [0.5 * a + 0.5 * b for a, b in zip(p, q, strict=True)]
    assert run("jsd", teacher, beta=0.5) == pytest.approx(0.5 * kl(p, m) + 0.5 * kl(q, m), rel=1e-5)
    mix = [0.1 * a + 0.9 * b for a, b in zip(p, q, strict=True)]
    assert run("skew_kl", teacher, skew=0.1) == pytest.approx(kl(p, mix), rel=1e-5)


def test_temperature_scales_by_t_squared_on_the_softened_buckets():
    """At T = 2 the tail bucket holds the mass of n equal logits L - log n (format.py), × T²."""
    t, keep, n = 2.0, [0, 1], 3
    tail_lse = math.log(sum(math.exp(v) for v in T_LOGITS[2:]))
    teacher_buckets = [T_LOGITS[0] / t, T_LOGITS[1] / t, math.log(n) + (tail_lse - math.log(n)) / t]
    p = softmax(teacher_buckets)
    q = buckets(S_LOGITS, keep, t)
    assert run("hinton", topk(T_LOGITS, 2), t) == pytest.approx(t**2 * kl(p, q), rel=1e-5)


@pytest.mark.parametrize("beta,same_as", [(0.0, "hinton"), (1.0, "reverse_kl")])
def test_jsd_endpoints_are_the_two_kls(beta, same_as):
    teacher = topk(T_LOGITS, 3)
    assert run("jsd", teacher, beta=beta) == pytest.approx(run(same_as, teacher), rel=1e-6)


def test_jsd_is_symmetric_and_bounded_at_one_half():
    a, b = torch.tensor([T_LOGITS]), torch.tensor([S_LOGITS])
    ab = float(sparse_divergence(b, a, "jsd", 1.0, beta=0.5)[0])
    ba = float(sparse_divergence(a, b, "jsd", 1.0, beta=0.5)[0])
    assert ab == pytest.approx(ba, rel=1e-5) and 0 < ab < math.log(2)


def test_skew_zero_is_forward_kl_and_skew_bounds_it():
    teacher = torch.tensor([T_LOGITS])
    assert run("skew_kl", teacher, skew=0.0) == pytest.approx(run("hinton", teacher))
    far = torch.tensor([[-20.0, 20.0, 0.0, 0.0, 0.0]])  # a student far from the teacher
    assert float(sparse_divergence(far, teacher, "skew_kl", 1.0, skew=0.1)[0]) <= math.log(10) + 1e-6
    assert float(sparse_divergence(far, teacher, "hinton", 1.0)[0]) > math.log(10)


def test_identical_distributions_give_zero_and_gradients_are_finite():
    z = torch.tensor([T_LOGITS], requires_grad=True)
    for name in ("hinton", "reverse_kl", "jsd", "skew_kl"):
        loss = sparse_divergence(z, topk(T_LOGITS, 2), name, 1.0)
        assert float(loss) == pytest.approx(0.0, abs=1e-6)
        loss.sum().backward()
        assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("name", ["reverse_kl", "jsd", "skew_kl"])
def test_losses_mix_ce_on_labelled_rows_and_read_topk(name):
    d = DistillParams(loss=name, temperature=1.0, alpha=0.25)
    assert reads_topk(d, 4) and not reads_topk(d, None)
    fn = build(d, 4)
    s = torch.tensor([S_LOGITS, S_LOGITS])
    teacher = TopKTensors(*[torch.cat([x, x]) for x in (topk(T_LOGITS, 4).values, topk(T_LOGITS, 4).indices,
                                                          topk(T_LOGITS, 4).tail_lse)], 1)
    out = fn(s, teacher, torch.tensor([1, -1]))
    soft = run(name, topk(T_LOGITS, 4))
    ce = -math.log(softmax(S_LOGITS)[1])
    assert float(out[0]) == pytest.approx(0.25 * soft + 0.75 * ce, rel=1e-5)
    assert float(out[1]) == pytest.approx(soft, rel=1e-5)  # an unlabelled row: the soft term alone
