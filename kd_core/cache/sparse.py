"""Which classes a sparse cache row keeps, on the teacher's device: the top-k, the fewest reaching
`top_p`, and classes sampled from the rest with their importance weights (`sampling`).

Keeping the top-k and one tail bucket drops the signal of every tail class, so a student trained on
it is biased (Anshumann et al. 2025, "Sparse Logit Sampling"). With `sampling: S` the row keeps an
exact head (the top-k, or fewer by `top_p`, at most K - S) and S classes drawn from the teacher's
distribution over the rest by systematic sampling (one uniform per row, S equally spaced points on
the tail's CDF): class i of tail mass m·q_i is drawn c_i times with E[c_i] = S·q_i, so its stored
weight m·c_i/S is unbiased. The drawn classes take the whole tail mass (tail_lse becomes -inf), so
forward KL against the row is an unbiased estimate of forward KL against the full distribution
(the cross-entropy term; the row's own entropy is a constant).

Every row is K slots wide; slots a row does not use hold value -inf and repeat the row's first
class, so the reader, `kd cache verify` and the losses need no ragged arrays. The uniform of a row
is a hash of its own logits (their log-sum-exp and argmax): the same row draws the same classes in
any batch, shard or worker, so serial and Dask builds stay byte-identical.
"""

from __future__ import annotations

import torch

_M1, _M2 = -4658895280553007687, -7723592293110705685  # splitmix64's multipliers as signed int64


def _shr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def row_uniform(logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """One uniform in [0, 1) per row from the row's content (splitmix64 of its lse bits and argmax).  # (B,)"""
    bits = lse.float().contiguous().view(torch.int32).to(torch.int64)
    x = (bits << 20) ^ logits.argmax(dim=-1).to(torch.int64) ^ 0x2545F4914F6CDD1D
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    x = x ^ _shr(x, 31)
    return _shr(x, 11).double().div(float(1 << 53)).float()


def head_mask(values: torch.Tensor, lse: torch.Tensor, top_p: float | None) -> torch.Tensor:
    """Which of the sorted candidates (B, H) the head keeps: the fewest whose probability reaches
    `top_p` (all H without it), at least one.  # (B, H) bool"""
    if top_p is None:
        return torch.ones_like(values, dtype=torch.bool)
    p = (values.float() - lse[:, None]).exp()
    before = p.cumsum(dim=-1) - p  # mass of the classes ranked above each one
    keep = before < top_p
    keep[:, 0] = True
    return keep


def systematic_draws(tail: torch.Tensor, tail_lse: torch.Tensor, draws: int, u: torch.Tensor) -> torch.Tensor:
    """Counts of `draws` systematic samples from softmax(tail) per row.  # (B, C) logits -inf on the head -> (B, C)"""
    q = (tail.float() - tail_lse[:, None]).exp()  # (B, C) the tail's own distribution; 0 on the head
    cdf = q.cumsum(dim=-1)
    cdf = cdf / cdf[:, -1:].clamp_min(1e-30)  # exact 1 at the end: every point lands on a class
    points = (torch.arange(draws, device=tail.device, dtype=torch.float32)[None, :] + u[:, None]) / draws
    picked = torch.searchsorted(cdf, points.contiguous(), right=True).clamp_max(tail.shape[1] - 1)  # (B, S)
    counts = torch.zeros(tail.shape, dtype=torch.float32, device=tail.device)
    counts.scatter_add_(-1, picked, torch.ones_like(points))
    return counts.masked_fill_(~torch.isfinite(tail), 0.0)  # a float32 cdf step onto a head class: never kept


def sparse_rows(logits: torch.Tensor, k: int, top_p: float | None, sampling: int | None,
                consume: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, indices, tail_lse) of a top-p and/or sampled row: K slots sorted by value, -inf padded.

    Values are raw-logit equivalents (log weight + the row's log-sum-exp), so softmax over a row's
    values and its tail bucket gives the stored distribution, as for a plain top-k row.
    """
    draws = sampling or 0
    lse = torch.logsumexp(logits.float(), dim=-1)  # (B,)
    values, indices = logits.topk(k - draws, dim=-1)  # (B, H) candidates for the head
    keep = head_mask(values, lse, top_p)
    u = row_uniform(logits, lse) if draws else None  # before `consume` overwrites the row
    values = values.float().masked_fill(~keep, float("-inf"))
    kept = torch.where(keep, indices, indices[:, :1])  # candidates top_p leaves out stay in the tail
    tail = logits.scatter_(-1, kept, float("-inf")) if consume else logits.scatter(-1, kept, float("-inf"))
    tail_lse = torch.logsumexp(tail.float(), dim=-1)  # (B,)
    if draws:
        assert u is not None
        counts = systematic_draws(tail, tail_lse, draws, u)
        top_counts, drawn = counts.topk(draws, dim=-1)  # (B, S): every drawn class (<= S distinct), then zeros
        weight = tail_lse[:, None] + (top_counts / draws).log()  # log(m·c/S) + lse; -inf where nothing drawn
        values, indices = torch.cat([values, weight], dim=-1), torch.cat([indices, drawn], dim=-1)
        tail_lse = torch.full_like(tail_lse, float("-inf"))
    values, order = values.sort(dim=-1, descending=True, stable=True)
    indices = indices.gather(-1, order)
    indices = torch.where(torch.isfinite(values), indices, indices[:, :1])  # unused slots repeat the first class
    return values, indices, tail_lse


def clamp_tail_rows(tail_lse: torch.Tensor, as_stored: torch.Tensor, n_classes: int) -> torch.Tensor:
    """`format.clamp_tail` for rows of different sizes, on the device: the tail's equal per-class logit
    L - log n (n = the row's own tail size) never above its smallest kept value as stored.  # (B,)"""
    finite = torch.isfinite(as_stored)
    n = (n_classes - finite.sum(dim=-1)).clamp_min(1).double()  # unused slots hold -inf
    row_min = torch.where(finite, as_stored, torch.full_like(as_stored, float("inf"))).amin(dim=-1)
    limit = row_min.double() + n.log()
    limit32 = limit.float()
    limit32 = torch.where(limit32.double() > limit, torch.nextafter(limit32, torch.tensor(float("-inf"))), limit32)
    return torch.minimum(tail_lse.float(), limit32)
