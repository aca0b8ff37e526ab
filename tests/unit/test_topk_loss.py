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


def _cache(tmp_path, z: torch.Tensor, k: int, dtype: str = "float32"):
    from kd_core.cache import CacheSettings, LogitCache, build_cache, cache_key

    settings = CacheSettings(dtype, 32, k)
    key = cache_key("t", "d", settings)
    build_cache(lambda a, b: z[a:b], len(z), z.shape[1], tmp_path / "c", tmp_path / "w", key, settings, {})
    return LogitCache(tmp_path / "c", key)


def test_training_targets_give_the_loss_of_the_old_densified_path(tmp_path):
    """`targets` (top-k, never densified) must give what densifying with `take` and re-extracting gave."""
    import numpy as np

    from kd_core.losses import UNLABELLED, topk_kd

    torch.manual_seed(2)
    z = torch.randn(64, 30) * 3
    cache, idx = _cache(tmp_path, z, 5), np.arange(64)
    s, labels = torch.randn(64, 30), torch.full((64,), UNLABELLED)
    got = topk_kd(s, cache.targets(idx).to(torch.device("cpu")), labels, 2.0, 0.9)
    dense = torch.from_numpy(cache.take(idx))  # the old path: (B, C), then top-k and tail re-extracted
    values, indices = dense.topk(5, dim=-1)
    tail = dense.scatter(-1, indices, float("-inf")).logsumexp(-1)
    old = topk_kl(s, values, indices, tail, 25, 2.0)  # unlabelled rows: the soft term alone
    torch.testing.assert_close(got, old, atol=1e-5, rtol=1e-5)


def test_a_large_vocabulary_is_trained_from_top_k_without_a_dense_row(tmp_path):
    """200,000 classes, K = 8: what training reads is (B, K) arrays; only the student's row is (B, C)."""
    import numpy as np

    from kd_core.cache import TopK
    from kd_core.losses import UNLABELLED, topk_kd

    torch.manual_seed(3)
    z = torch.randn(40, 200_000)
    cache = _cache(tmp_path, z, 8, "float16")
    t = cache.targets(np.array([3, 17, 0, 39]))
    assert isinstance(t, TopK) and t.values.shape == t.indices.shape == (4, 8) and t.tail_lse.shape == (4,)
    loss = topk_kd(torch.randn(4, 200_000), t.to(torch.device("cpu")), torch.full((4,), UNLABELLED), 2.0, 1.0)
    assert loss.shape == (4,) and torch.isfinite(loss).all()
    assert np.array_equal(t.argmax(), z[[3, 17, 0, 39]].argmax(-1).numpy())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_rounded_values_never_fall_below_the_tail_fill(tmp_path, dtype):
    """After float16/bfloat16 rounding the smallest kept logit may drop below the tail's equal logit
    L - log n; the cache clamps the tail so a tail class never looks likelier than a kept one."""
    import numpy as np

    n = 50
    z = torch.full((n, 100), 10.002)  # the tail: 96 equal logits, so L - log n = 10.002
    z[:, :4] = 10.0025 + torch.linspace(0, 1e-3, 4)  # kept: above the tail, but they round down to 10.0
    cache = _cache(tmp_path, z, 4, dtype)
    t = cache.take_topk(np.arange(n))
    fill = t.tail_lse - np.log(t.n_tail)
    assert (fill <= t.values.min(axis=1)).all(), (fill[:3], t.values.min(axis=1)[:3])
    dense = cache.take(np.arange(n))
    assert (np.sort(dense, axis=1)[:, -4:].min(axis=1) >= fill - 1e-6).all()
