"""The top-k-aware KL against hand computations and its limits."""

import math

import pytest
import torch

from kd_core.losses import soft_kl, topk_kl


def test_topk_with_every_class_is_the_dense_loss():
    torch.manual_seed(0)
    z, s = torch.randn(6, 9) * 3, torch.randn(6, 9)
    values, indices = z.topk(9, dim=-1)
    got = topk_kl(s, values, indices, torch.full((6,), float("-inf")), 0, 2.5)
    torch.testing.assert_close(got, soft_kl(s, z, 2.5), atol=1e-5, rtol=1e-5)


def test_bucket_kl_matches_hand_computation():
    # teacher logits [3, 1, 0, -1]: top-2 = classes 0, 1; tail = {2, 3}
    s = torch.tensor([[2.0, 0.5, 0.5, 0.0]])
    T = 2.0
    values, indices = torch.tensor([[3.0, 1.0]]), torch.tensor([[0, 1]])
    tail_lse = math.log(math.exp(0.0) + math.exp(-1.0))
    # teacher buckets at T: exp(3/T), exp(1/T), and the tail as 2 equal logits (L - log 2)
    t = [math.exp(3 / T), math.exp(1 / T), 2 * math.exp((tail_lse - math.log(2)) / T)]
    p_t = [v / sum(t) for v in t]
    e = [math.exp(v / T) for v in (2.0, 0.5, 0.5, 0.0)]
    p_s = [e[0] / sum(e), e[1] / sum(e), (e[2] + e[3]) / sum(e)]
    expected = T**2 * sum(a * math.log(a / b) for a, b in zip(p_t, p_s, strict=True))
    got = topk_kl(s, values, indices, torch.tensor([tail_lse]), 2, T)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_bucket_kl_never_exceeds_dense_kl_at_t1():
    """Merging classes into buckets can only lose information (data-processing inequality)."""
    torch.manual_seed(1)
    z, s = torch.randn(32, 40) * 3, torch.randn(32, 40) * 2
    values, indices = z.topk(5, dim=-1)
    tail = z.scatter(-1, indices, float("-inf")).logsumexp(-1)
    assert (topk_kl(s, values, indices, tail, 35, 1.0) <= soft_kl(s, z, 1.0) + 1e-5).all()


def test_topk_kd_recovers_the_cache_from_its_dense_view(tmp_path):
    """Training sees LogitCache.take(); topk_kd must equal topk_kl on the cached arrays themselves."""
    import numpy as np

    from kd_core.logits import CacheSettings, LogitCache, build_cache, cache_key
    from kd_core.losses import UNLABELLED, topk_kd

    torch.manual_seed(2)
    z = torch.randn(64, 30) * 3
    settings = CacheSettings("float32", 32, 5)
    key = cache_key("t", "d", settings)
    build_cache(lambda a, b: z[a:b], 64, 30, tmp_path / "c", tmp_path / "w", key, settings, {})
    cache, idx = LogitCache(tmp_path / "c", key), np.arange(64)
    t = cache.take_topk(idx)
    s, labels = torch.randn(64, 30), torch.full((64,), UNLABELLED)
    expected = topk_kl(s, torch.from_numpy(t.values), torch.from_numpy(t.indices), torch.from_numpy(t.tail_lse),
                       t.n_tail, 2.0)
    got = topk_kd(s, torch.from_numpy(cache.take(idx)), labels, 5, 2.0, 0.9)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
