"""Knowledge-distillation losses and the registry `distill.loss` picks from.

Every loss takes student logits (B, K), cached teacher logits (B, K) and labels (B,) where ``-1``
marks an unlabelled (transfer) row, and returns the **per-row** loss (B,). The training loop does
the reduction: it divides the sum by the global batch size, which keeps DistributedDataParallel
ranks with unequal shares of a batch exact (kd_core.train).

Labelled rows mix a soft term with hard-label cross-entropy, α·soft + (1-α)·CE; transfer rows have
no label, so the teacher's signal is all they have and the soft term takes the full weight.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kd_core.config import DistillParams
from kd_core.divergences import DIVERGENCES, bucket_log_probs, forward_kl, sparse_divergence
from kd_core.models import Catalog, combine_logits

if TYPE_CHECKING:
    from kd_core.cache.reader import TopKTensors

UNLABELLED = -1

LossFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]  # (B,K), (B,K), (B,) -> (B,)
LOSSES: Catalog[Callable[[DistillParams], LossFn]] = Catalog("loss")  # name -> factory(DistillParams) -> LossFn


def reads_topk(distill: DistillParams, top_k: int | None) -> bool:
    """Whether the loss reads a top-k cache as top-k (`LogitCache.targets`: O(B·K') per batch) rather
    than as its dense view (`LogitCache.take`: O(B·C), which rules out large vocabularies)."""
    return bool(top_k) and distill.loss in DIVERGENCES


def build(distill: DistillParams, top_k: int | None = None) -> LossFn:
    """The loss `distill.loss` names, configured by the rest of `distill`.

    With a top-k cache (`top_k`), `hinton` becomes its top-k-aware form (`topk_kd`) and the
    divergences (reverse KL, JSD, skew KL) read top-k targets too; the other losses see the cache's
    dense view, whose tail is the equal-logit approximation (kd_core/cache/format.py).
    """
    if reads_topk(distill, top_k) and distill.loss == "hinton":
        return partial(topk_kd, temperature=distill.temperature, alpha=distill.alpha)
    return LOSSES.get(distill.loss)(distill)


def ensemble_targets(takes: list[Callable[[np.ndarray], np.ndarray]], mode: str, idx: np.ndarray) -> np.ndarray:
    """Several teachers' cached logits for rows `idx` combined into the ensemble teacher's logits.  # (B,) -> (B, K)

    Exactly what the ensemble model in the teacher directory computes (models.combine_logits), so the
    teacher that eval.json scores is the teacher the student learns from, softened by T in the loss.
    """
    z = torch.from_numpy(np.stack([take(idx) for take in takes]).astype(np.float32))  # (M, B, K)
    return combine_logits(z, mode).numpy()


def _mix(soft: torch.Tensor, student: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """Labelled rows: α·soft + (1-α)·CE(s, y); transfer rows: soft alone.  # (B,) -> (B,)"""
    labelled = labels != UNLABELLED  # (B,)
    ce = F.cross_entropy(student.float(), labels.clamp(min=0), reduction="none")  # (B,)
    return torch.where(labelled, alpha * soft + (1 - alpha) * ce, soft)


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
    """Hinton KD: labelled rows get α·T²·KL + (1-α)·CE(s, y); transfer rows get T²·KL only.  # (B,)

    L_i = labelled_i · (α·soft_i + (1-α)·ce_i) + (1-labelled_i) · soft_i,  soft_i = T²·KL_i (soft_kl).
    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network" (2015).
    """
    return _mix(soft_kl(student, teacher, temperature), student, labels, alpha)


def logit_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-row mean over classes of (s - t)²: regress the teacher's raw logits.  # (B, K), (B, K) -> (B,)

    Ba & Caruana, "Do Deep Nets Really Need to be Deep?" (2014); Hinton et al. (2015, §2.1) show it
    is KD's high-temperature limit: for zero-mean logits T²·KL → (1/2K)·Σ(s - t)² as T → ∞. It
    weights every logit alike, including the very negative ones a softmax at low T ignores. The mean
    over classes (not the sum) keeps its scale independent of K, as cross-entropy's is; no T.
    """
    return (student.float() - teacher.float()).pow(2).mean(dim=-1)


def mse_kd(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, alpha: float) -> torch.Tensor:
    """Logit matching mixed with CE: labelled rows α·MSE + (1-α)·CE(s, y); transfer rows MSE.  # (B,)"""
    return _mix(logit_mse(student, teacher), student, labels, alpha)


def dkd_terms(student: torch.Tensor, teacher: torch.Tensor, target: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (TCKD, NCKD) of Decoupled KD at temperature T, without the T² factor.  # (B,), (B,)

    With p = softmax(z/T) and target class c, Hinton's KL splits exactly (Zhao et al. 2022, eq. 7):
        KL(p_t ‖ p_s) = TCKD + (1 - p_t[c]) · NCKD
    TCKD = KL(b_t ‖ b_s) on the binary split b = [p[c], 1 - p[c]]: how sure of the target class.
    NCKD = KL(p̂_t ‖ p̂_s) on the non-target classes renormalised, p̂_k = p_k / (1 - p[c]): the
    "dark knowledge" of how the other classes relate. Computed in log space: log(1 - p[c]) is the
    log-sum-exp of the non-target log-probabilities, which never cancels catastrophically.
    """
    log_p_s = F.log_softmax(student.float() / temperature, dim=-1)  # (B, K)
    log_p_t = F.log_softmax(teacher.float() / temperature, dim=-1)  # (B, K)
    is_target = F.one_hot(target, log_p_s.shape[-1]).bool()  # (B, K)
    log_rest_s = log_p_s.masked_fill(is_target, float("-inf")).logsumexp(dim=-1)  # (B,) log(1 - p_s[c])
    log_rest_t = log_p_t.masked_fill(is_target, float("-inf")).logsumexp(dim=-1)  # (B,)
    log_b_s = torch.stack([log_p_s.gather(-1, target[:, None])[:, 0], log_rest_s], dim=-1)  # (B, 2)
    log_b_t = torch.stack([log_p_t.gather(-1, target[:, None])[:, 0], log_rest_t], dim=-1)  # (B, 2)
    tckd = (log_b_t.exp() * (log_b_t - log_b_s)).sum(dim=-1)  # (B,)
    log_hat_s = log_p_s - log_rest_s[:, None]  # (B, K) log p̂_s; the target column is not used
    log_hat_t = log_p_t - log_rest_t[:, None]  # (B, K)
    nckd = (log_hat_t.exp() * (log_hat_t - log_hat_s)).masked_fill(is_target, 0.0).sum(dim=-1)  # (B,)
    return tckd, nckd


def dkd(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float, alpha: float,
        tckd_weight: float, nckd_weight: float) -> torch.Tensor:
    """Decoupled KD mixed with CE: soft_i = T²·(a·TCKD_i + b·NCKD_i), then α-mixed as Hinton KD.  # (B,)

    Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation" (CVPR 2022). In plain KD the
    factor (1 - p_t[c]) shrinks NCKD exactly on the rows the teacher is sure of, whose dark knowledge
    is the most reliable; DKD drops it and weights the two terms freely (a = `distill.dkd_alpha`,
    b = `distill.dkd_beta`; the paper's a = 1, b = 8 on CIFAR-100). T² as in Hinton KD keeps the
    gradient scale independent of T. The target c is the label on labelled rows and, on transfer
    rows (no label), the teacher's argmax: the class the teacher would have labelled the row with.
    """
    target = torch.where(labels != UNLABELLED, labels, teacher.argmax(dim=-1))  # (B,)
    tckd, nckd = dkd_terms(student, teacher, target, temperature)
    return _mix(temperature**2 * (tckd_weight * tckd + nckd_weight * nckd), student, labels, alpha)


def pearson(a: torch.Tensor, b: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of `a` and `b` along `dim`: the cosine of the centred vectors.  # (B, K) -> (K,) or (B,)

    ρ = ⟨a - ā, b - b̄⟩ / (‖a - ā‖·‖b - b̄‖ + ε). The ε makes ρ of a constant vector (no variance: a row
    of equal logits, one row down a column) 0 rather than 0/0, so the loss and its gradient stay finite.
    ρ ignores scale, so its gradient grows as 1/‖a - ā‖ near a constant `a`: finite (ε), but large.
    """
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    return (a * b).sum(dim=dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


def dist_terms(student: torch.Tensor, teacher: torch.Tensor,
               temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """DIST's (inter-class, intra-class) relation losses at temperature T, without T².  # (B,), ()

    With p = softmax(z/T) in float32 (bf16 logits would round the small probabilities' variances away):
    inter_i = 1 - ρ(p_s[i, :], p_t[i, :]), across the classes of row i: how the teacher ranks the classes
    for this input. intra = 1 - (1/K)·Σ_j ρ(p_s[:, j], p_t[:, j]), across the batch's rows for class j:
    which inputs the teacher finds most class-j-like. The intra term is a statistic of the whole batch;
    with one row there is nothing to correlate across, so it is 0 there.
    """
    p_s = F.softmax(student.float() / temperature, dim=-1)  # (B, K)
    p_t = F.softmax(teacher.float() / temperature, dim=-1)  # (B, K)
    inter = 1 - pearson(p_s, p_t, dim=-1)  # (B,)
    if p_s.shape[0] < 2:
        return inter, p_s.new_zeros(())
    return inter, 1 - pearson(p_s, p_t, dim=0).mean()  # (B,), ()


def dist_kd(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, temperature: float, alpha: float,
            beta: float, gamma: float) -> torch.Tensor:
    """DIST mixed with CE: soft_i = T²·(β·inter_i + γ·intra), then α-mixed as Hinton KD.  # (B,)

    Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger Teacher" (NeurIPS 2022), whose
    names these are: inter-class per row, intra-class per class (dist_terms). Matching correlations
    instead of KL asks the student for the teacher's relations, not its exact probabilities: any positive
    affine map of the teacher's scores 0, which helps a much smaller student when the teacher is far
    stronger. β = `distill.dist_beta`, γ = `distill.dist_gamma` (the authors' default 1, 1). T² is the
    authors' code's, as in Hinton KD; unlike KL's, the correlation's gradients do not shrink as 1/T², so
    at T > 1 it also raises the soft term's weight (the paper: T = 1).

    The intra term is one number per batch; every row carries it, so the training loop's sum over rows
    divided by the batch size counts it once, as the paper's loss does. Under DDP each rank computes it
    over its own share of the global batch, and the update averages the ranks' values weighted by their
    shares: an approximation of the global batch's correlation, exact on one process.
    """
    inter, intra = dist_terms(student, teacher, temperature)  # (B,), ()
    return _mix(temperature**2 * (beta * inter + gamma * intra), student, labels, alpha)


def hard_ce(student: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy on labelled rows, 0 on unlabelled ones: the hard-label baseline's loss.  # (B,)"""
    labelled = labels != UNLABELLED  # (B,)
    ce = F.cross_entropy(student.float(), labels.clamp(min=0), reduction="none")  # (B,)
    return torch.where(labelled, ce, torch.zeros_like(ce))


def topk_kl(student: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, tail_lse: torch.Tensor,
            n_tail: int | torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-row T² · KL over K'+1 buckets — the teacher's top-K' classes and one tail bucket.  # (B,)

    KL = Σ_b p_t(b) (log p_t(b) - log p_s(b)) on the buckets of `divergences.bucket_log_probs`; × T²
    as in Hinton KD. Only what the cache knows is matched: unlike KL against a reconstructed dense
    teacher, nothing pushes the student's tail to be uniform (Hinton et al. 2015; top-k soft labels as
    in DistillKit / Megatron KD).
    """
    log_p_t, log_p_s = bucket_log_probs(student, values, indices, tail_lse, n_tail, temperature)
    return (temperature**2) * forward_kl(log_p_t, log_p_s)


def divergence_kd(student: torch.Tensor, teacher: torch.Tensor | TopKTensors, labels: torch.Tensor, name: str,
                  temperature: float, alpha: float, beta: float, skew: float) -> torch.Tensor:
    """A divergence of kd_core.divergences (reverse KL, JSD(β), skew KL) on a top-k or dense teacher,
    mixed with CE as in `hinton_kd`.  # (B,)"""
    soft = sparse_divergence(student, teacher, name, temperature, beta, skew)
    return _mix(soft, student, labels, alpha)


# --- the registry: `distill.loss` -> a configured LossFn ------------------------------------------

@LOSSES.register("hinton")
def _hinton(d: DistillParams) -> LossFn:
    return partial(hinton_kd, temperature=d.temperature, alpha=d.alpha)


@LOSSES.register("mse")
def _mse(d: DistillParams) -> LossFn:
    return partial(mse_kd, alpha=d.alpha)


@LOSSES.register("dkd")
def _dkd(d: DistillParams) -> LossFn:
    return partial(dkd, temperature=d.temperature, alpha=d.alpha, tckd_weight=d.dkd_alpha, nckd_weight=d.dkd_beta)


@LOSSES.register("dist")
def _dist(d: DistillParams) -> LossFn:
    return partial(dist_kd, temperature=d.temperature, alpha=d.alpha, beta=d.dist_beta, gamma=d.dist_gamma)


def _divergence(name: str):
    def factory(d: DistillParams) -> LossFn:
        return partial(divergence_kd, name=name, temperature=d.temperature, alpha=d.alpha, beta=d.jsd_beta,
                       skew=d.skew)
    return factory


for _name in ("reverse_kl", "jsd", "skew_kl"):
    LOSSES.register(_name)(_divergence(_name))


@LOSSES.register("mse_l2")
def _mse_l2(_d: DistillParams) -> LossFn:
    return cast(LossFn, output_mse)  # distillation losses are called with a teacher, never None


def output_mse(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The `mse_l2` preset's data term: logit MSE on every row, no hard labels.  # (B,)

    The preset minimises (1/B)·Σ_i mean_k (s_ik - t_ik)² + λ‖W_student‖², regression on the teacher's
    outputs with an explicit L2 penalty (Ba & Caruana 2014's objective; λ = `distill.l2`). The penalty
    needs the weights, which a loss never sees: train_student adds it (`l2_weight`, `l2_penalty`).
    """
    return logit_mse(student, teacher)


def l2_weight(distill: DistillParams) -> float:
    """λ of the λ‖W_student‖² term: only the `mse_l2` preset puts it in the objective."""
    return distill.l2 if distill.loss == "mse_l2" else 0.0


def l2_penalty(model: nn.Module) -> torch.Tensor:
    """‖W‖² = Σ w² over weight matrices and kernels (dim ≥ 2): biases are not decayed, as is usual.  # ()"""
    return sum((w.float().pow(2).sum() for w in model.parameters() if w.dim() >= 2), torch.zeros(()))


# --- hint losses: a student feature, projected to the teacher's shape, against a cached teacher feature

HintFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (B, *S), (B, *S) -> (B,)
HINTS: Catalog[HintFn] = Catalog("hint loss")  # `distill.features[].loss` -> HintFn


@HINTS.register("mse")
def hint_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """FitNets hint: per-row mean over the feature's n elements of (r(s) - t)².  # (B, *S), (B, *S) -> (B,)

    L_i = (1/n)·Σ_j (r(s)_ij - t_ij)², r the learned projection (kd_core.features). Romero et al.,
    "FitNets: Hints for Thin Deep Nets" (ICLR 2015, eq. 3) write ½‖·‖²; the mean over elements instead
    keeps the term's scale independent of the layer's size, so one weight suits any layer.
    """
    return (student.float() - teacher.float()).pow(2).flatten(1).mean(dim=1)


@HINTS.register("cosine")
def hint_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Per-row 1 - cos(r(s), t) over the flattened feature.  # (B, *S), (B, *S) -> (B,)

    L_i = 1 - ⟨s_i, t_i⟩ / (‖s_i‖·‖t_i‖): aligns the direction of the representation and ignores its
    scale, so a teacher with large activations does not swamp the other terms. Sanh, Debut, Chaumond &
    Wolf, "DistilBERT" (2019): the cosine embedding loss on hidden states.
    """
    return 1 - F.cosine_similarity(student.float().flatten(1), teacher.float().flatten(1), dim=1, eps=1e-8)


def attention_map(a: torch.Tensor) -> torch.Tensor:
    """q = Q / ‖Q‖₂ with Q = Σ_c a_c²: where a channels-first map is active.  # (B, C, *S) -> (B, prod S)"""
    return F.normalize(a.float().pow(2).sum(dim=1).flatten(1), dim=1)


@HINTS.register("attention")
def attention_transfer(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Attention transfer: per-row mean over the n positions of (q_s - q_t)².  # (B, C_s, *S), (B, C_t, *S) -> (B,)

    q = attention_map(a) = Q/‖Q‖₂, Q = Σ_c a_c² (p = 2); L_i = (1/n)·Σ_j (q_s,ij - q_t,ij)². Zagoruyko &
    Komodakis, "Paying More Attention to Attention" (ICLR 2017, eq. 2), as the authors' `at_loss`
    computes it (the mean of squared differences; their β/2 is the hint's weight). Summing over
    channels makes the map channel-free: the student may be narrower than the teacher without a
    projection, but both must have the same positions (length of a sequence, size of a map).
    """
    return (attention_map(student) - attention_map(teacher)).pow(2).mean(dim=1)


def topk_kd(student: torch.Tensor, teacher: TopKTensors, labels: torch.Tensor, temperature: float,
            alpha: float) -> torch.Tensor:
    """Hinton KD from a top-k cache: the soft term is `topk_kl`, mixed with CE as in `hinton_kd`.  # (B,)

    `teacher` holds the cached top-K' values, their class indices and the tail's log-sum-exp: the
    loss gathers the student's logits at those indices and never builds a (B, C) teacher row.
    """
    return _mix(topk_kl(student, teacher.values, teacher.indices, teacher.tail_lse, teacher.n_tail, temperature),
                student, labels, alpha)
