"""How much does a top-k cache lose against a dense one? KL error and gradient agreement at T ∈ {1,2,4}.

    .venv/bin/python bench/topk.py

Teacher logits: 1,000 classes with a Zipf-like profile (a few likely classes, a long tail — the shape of
a trained classifier or language model), 2,048 rows. Student logits: the teacher's plus noise (a
student part-way through training). For each K and T, against the exact dense T²·KL:
  loss error   |topk - dense| / dense for the top-k-aware loss (kd_core.losses.topk_kl), and for KL
               against the dense view a top-k cache reconstructs (equal-logit tail, LogitCache.take)
  grad cosine  cosine between the gradients w.r.t. the student logits (what training follows)
"""

from __future__ import annotations

import math

import torch

from kd_core.losses import soft_kl, topk_kl

ROWS, CLASSES = 2048, 1000


def zipf_teacher(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ranks = torch.argsort(torch.rand(ROWS, CLASSES, generator=g), dim=-1).float() + 1  # (N, C)
    return -1.1 * torch.log(ranks) * 2.5 + 0.3 * torch.randn(ROWS, CLASSES, generator=g)


def reconstruct(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    values, indices = z.topk(k, dim=-1)
    tail = z.scatter(-1, indices, float("-inf")).logsumexp(-1)
    n = CLASSES - k
    dense = torch.zeros_like(z) + (tail - math.log(n))[:, None]
    return values, indices, tail, dense.scatter(-1, indices, values)


def grad(loss_fn, s: torch.Tensor) -> tuple[float, torch.Tensor]:
    s = s.clone().requires_grad_(True)
    loss = loss_fn(s).mean()
    loss.backward()
    return loss.item(), s.grad.flatten()


def main() -> None:
    z = zipf_teacher()
    s = z + torch.randn(ROWS, CLASSES, generator=torch.Generator().manual_seed(1))
    head = f"{'topk-aware KL: err':>19} {'grad cos':>9} | {'dense view KL: err':>19} {'grad cos':>9}"
    print(f"{'K':>4} {'T':>3} | {head}")
    for k in (8, 32, 128):
        values, indices, tail, dense_view = reconstruct(z, k)
        for t in (1.0, 2.0, 4.0):
            exact, g_exact = grad(lambda x, t=t: soft_kl(x, z, t), s)
            approx, g_approx = grad(lambda x, t=t, v=values, i=indices, tl=tail, k=k:
                                    topk_kl(x, v, i, tl, CLASSES - k, t), s)
            view, g_view = grad(lambda x, t=t, d=dense_view: soft_kl(x, d, t), s)
            cos = torch.nn.functional.cosine_similarity
            print(f"{k:>4} {t:>3.0f} | {abs(approx - exact) / exact:>19.3%} {cos(g_approx, g_exact, dim=0):>9.4f} | "
                  f"{abs(view - exact) / exact:>19.3%} {cos(g_view, g_exact, dim=0):>9.4f}")


if __name__ == "__main__":
    main()
