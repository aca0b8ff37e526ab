"""Knowledge-distillation losses.

Every loss takes student logits, cached teacher logits and labels where ``-1`` marks an unlabelled
(transfer) row, and returns the batch mean of a per-row loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

UNLABELLED = -1


def soft_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row T² · KL(softmax(t/T) ‖ softmax(s/T)).  # (B, K), (B, K) -> (B,)

    Gradients of the softened KL shrink as 1/T², so multiplying by T² keeps the soft term's
    magnitude independent of T when it is mixed with the hard loss (Hinton et al. 2015, §2).
    """
    log_p_s = F.log_softmax(student.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    return (temperature**2) * (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=-1)


def hinton_kd(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
              temperature: float, alpha: float) -> torch.Tensor:
    """Hinton KD: labelled rows get α·T²·KL + (1-α)·CE(s, y); transfer rows get T²·KL only.

    L = mean_i [ labelled_i · (α·soft_i + (1-α)·ce_i) + (1-labelled_i) · soft_i ]
    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015). Transfer rows have
    no label, so the teacher's distribution is their only signal and takes the full weight.
    """
    soft = soft_kl(student, teacher, temperature)  # (B,)
    labelled = labels != UNLABELLED  # (B,)
    ce = F.cross_entropy(student.float(), labels.clamp(min=0), reduction="none")  # (B,)
    per_row = torch.where(labelled, alpha * soft + (1 - alpha) * ce, soft)
    return per_row.mean()


def hard_ce(student: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on labelled rows only: the hard-label baseline's loss."""
    labelled = labels != UNLABELLED
    return F.cross_entropy(student[labelled].float(), labels[labelled])


def topk_kl(student: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, tail_lse: torch.Tensor,
            n_tail: int, temperature: float) -> torch.Tensor:
    """Per-row T² · KL over K'+1 buckets — the teacher's top-K' classes and one tail bucket.  # (B,)

    Teacher: bucket logits v_i/T for the cached top-K' classes and, for the tail, the log-mass of n
    equal logits (L - log n)/T, where L is the tail's log-sum-exp at T = 1 (exact at T = 1).
    Student: its own softmax(s/T) on the same K' classes, and the summed mass of all other classes.
    KL = Σ_b p_t(b) (log p_t(b) - log p_s(b)); × T² as in Hinton KD. Only what the cache knows is
    matched: unlike KL against a reconstructed dense teacher, nothing pushes the student's tail to be
    uniform (Hinton et al. 2015; top-k soft labels as in DistillKit / Megatron KD).
    """
    t = temperature
    s = student.float() / t  # (B, K)
    log_z = torch.logsumexp(s, dim=-1, keepdim=True)  # (B, 1)
    s_top = s.gather(-1, indices) - log_z  # (B, K')
    t_top = values.float() / t  # (B, K')
    if n_tail > 0:
        log_n = torch.log(torch.tensor(float(n_tail)))
        t_tail = log_n + (tail_lse.float() - log_n) / t  # (B,)
        s_tail = torch.logsumexp(s.scatter(-1, indices, float("-inf")), dim=-1) - log_z[:, 0]  # (B,)
        t_top = torch.cat([t_top, t_tail[:, None]], dim=-1)  # (B, K'+1)
        s_top = torch.cat([s_top, s_tail[:, None]], dim=-1)  # (B, K'+1)
    log_p_t = F.log_softmax(t_top, dim=-1)
    return (t**2) * (log_p_t.exp() * (log_p_t - s_top)).sum(dim=-1)
