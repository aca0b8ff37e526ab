"""Divergences between teacher and student on the sparse cache's K'+1 buckets (issue 16).

A top-k cache knows the teacher's K' largest logits and the exact log-mass of everything else at
T = 1 (kd_core/cache/format.py). Both distributions are compared on the same K'+1 buckets: the
cached classes one by one, and the tail as one bucket (the student's tail is the summed mass of its
other classes). A dense teacher is the special case K' = C with an empty tail, so every divergence
here serves tables and text as well as language models, without a (B, C) teacher row for top-k.

    forward KL   KL(p_t ‖ p_s)                 mode-covering: Hinton et al. (2015)
    reverse KL   KL(p_s ‖ p_t)                 mode-seeking: MiniLLM (Gu et al. 2024)
    JSD(β)       β·KL(p_t ‖ m) + (1-β)·KL(p_s ‖ m),  m = β·p_t + (1-β)·p_s; β = 0 is forward KL and
                 β = 1 reverse KL (their limits, as TRL's GKD `generalized_jsd_loss` special-cases them)
    skew KL(a)   KL(p_t ‖ a·p_t + (1-a)·p_s)   DistiLLM (Ko et al. 2024): bounded, stable gradients

Each returns T² × the divergence per row (B,), as Hinton KD does, so the soft term's scale does not
depend on T when mixed with the hard loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from kd_core.cache.reader import TopKTensors


def bucket_log_probs(student: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, tail_lse: torch.Tensor,
                     n_tail: int | torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p_t, log p_s) on the K'+1 buckets at temperature T.  # (B, C), (B, K'), (B, K'), (B,) -> 2 × (B, K'[+1])

    Teacher: bucket logits v_i/T for the cached classes and, for the tail, the log-mass of n equal
    logits (L - log n)/T, L the tail's log-sum-exp at T = 1 (exact at T = 1). Student: its own
    softmax(s/T) on the same classes and the summed mass of all the others. No tail bucket when the
    cache kept every class (n = 0).
    """
    t = temperature
    s = student.float() / t  # (B, C)
    log_z = torch.logsumexp(s, dim=-1, keepdim=True)  # (B, 1)
    s_top = s.gather(-1, indices) - log_z  # (B, K')
    t_top = values.float() / t  # (B, K')
    s_top = torch.where(torch.isfinite(t_top), s_top, torch.full_like(s_top, float("-inf")))  # unused slots
    if isinstance(n_tail, torch.Tensor) or n_tail > 0:
        log_n = torch.as_tensor(n_tail, device=values.device).clamp_min(1).double().log().float()  # () or (B,)
        t_tail = log_n + (tail_lse.float() - log_n) / t  # (B,)
        s_tail = torch.logsumexp(s.scatter(-1, indices, float("-inf")), dim=-1) - log_z[:, 0]  # (B,)
        t_top = torch.cat([t_top, t_tail[:, None]], dim=-1)  # (B, K'+1)
        s_top = torch.cat([s_top, s_tail[:, None]], dim=-1)  # (B, K'+1)
    return F.log_softmax(t_top, dim=-1), s_top


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per row from log-probabilities; 0·log 0 counts as 0.  # (B, K), (B, K) -> (B,)"""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)


def _mixture(log_p: torch.Tensor, log_q: torch.Tensor, w: float) -> torch.Tensor:
    """log(w·p + (1-w)·q), computed in log space.  # (B, K)"""
    return torch.logsumexp(torch.stack([log_p + math.log(w), log_q + math.log1p(-w)]), dim=0)


def forward_kl(log_t: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    return _kl(log_t, log_s)


def reverse_kl(log_t: torch.Tensor, log_s: torch.Tensor) -> torch.Tensor:
    return _kl(log_s, log_t)


def generalized_jsd(log_t: torch.Tensor, log_s: torch.Tensor, beta: float) -> torch.Tensor:
    """β·KL(p_t ‖ m) + (1-β)·KL(p_s ‖ m), m = β·p_t + (1-β)·p_s; forward KL at β = 0, reverse at β = 1."""
    if beta <= 0:
        return forward_kl(log_t, log_s)
    if beta >= 1:
        return reverse_kl(log_t, log_s)
    log_m = _mixture(log_t, log_s, beta)
    return beta * _kl(log_t, log_m) + (1 - beta) * _kl(log_s, log_m)


def skew_kl(log_t: torch.Tensor, log_s: torch.Tensor, skew: float) -> torch.Tensor:
    """KL(p_t ‖ a·p_t + (1-a)·p_s): forward KL at a = 0; bounded by log(1/a) for a > 0."""
    return forward_kl(log_t, log_s) if skew <= 0 else _kl(log_t, _mixture(log_t, log_s, skew))


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {"hinton": forward_kl, "reverse_kl": reverse_kl,
                                                       "jsd": generalized_jsd, "skew_kl": skew_kl}


def as_buckets(teacher: torch.Tensor | TopKTensors) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                       int | torch.Tensor]:
    """(values, indices, tail_lse, n_tail) of a top-k batch, or of dense logits (B, C) as C buckets."""
    if isinstance(teacher, torch.Tensor):
        b, c = teacher.shape
        idx = torch.arange(c, device=teacher.device).expand(b, c)
        return teacher, idx, torch.full((b,), float("-inf"), device=teacher.device), 0
    return teacher.values, teacher.indices, teacher.tail_lse, teacher.n_tail


def sparse_divergence(student: torch.Tensor, teacher: torch.Tensor | TopKTensors, name: str, temperature: float,
                      beta: float = 0.5, skew: float = 0.1) -> torch.Tensor:
    """T² · divergence `name` per row between the student's logits and a top-k (or dense) teacher.  # (B,)"""
    log_t, log_s = bucket_log_probs(student, *as_buckets(teacher), temperature)
    fn = DIVERGENCES[name]
    extra = {"jsd": (beta,), "skew_kl": (skew,)}.get(name, ())
    return temperature**2 * fn(log_t, log_s, *extra)
