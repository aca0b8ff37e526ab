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
