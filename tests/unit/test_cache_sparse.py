"""cache.top_p, cache.sampling and cache.encoding compact: what rows keep, unbiased weights, the
compact frame's error and refusals, and losses on rows of different sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_core.cache import CacheSettings, LogitCache, build_cache, cache_key, verify_cache
from kd_core.cache.compact import pack, unpack
from kd_core.cache.encode import encode_batch, to_host
from kd_core.cache.reader import TopKTensors
from kd_core.cache.sparse import sparse_rows
from kd_core.divergences import forward_kl, sparse_divergence
from kd_core.losses import topk_kl

C = 300


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ranks = torch.argsort(torch.rand(rows, C, generator=g), dim=-1).float() + 1
    return -2.5 * torch.log(ranks) + 0.3 * torch.randn(rows, C, generator=g)  # Zipf-like rows


def _arrays(logits: torch.Tensor, s: CacheSettings) -> dict[str, np.ndarray]:
    return to_host(encode_batch(logits.clone(), [], s, C)).arrays(s, C, (0, len(logits)))


def test_top_p_keeps_the_fewest_classes_reaching_p_and_the_exact_tail() -> None:
    z = _logits(64)
    v, i, tail = sparse_rows(z.clone(), 32, 0.6, None)
    p = z.softmax(-1)
    for r in range(len(z)):
        kept = torch.isfinite(v[r])
        n = int(kept.sum())
        sorted_p = p[r].sort(descending=True).values
        assert sorted_p[:n].sum() >= 0.6 - 1e-5 or n == 32
        assert n == 1 or sorted_p[:n - 1].sum() < 0.6
        assert set(i[r, kept].tolist()) == set(p[r].topk(n).indices.tolist())
        assert (i[r, ~kept] == i[r, 0]).all()  # unused slots repeat the first class
        rest = torch.ones(C, dtype=torch.bool)
        rest[i[r, kept]] = False
        assert torch.allclose(tail[r], z[r, rest].logsumexp(0), atol=1e-5)


def test_sampled_weights_are_unbiased_and_carry_the_whole_mass() -> None:
    base = _logits(1, seed=3)[0]
    shifts = torch.linspace(0, 1, 4000)[:, None]  # the same distribution, a different draw per row
    v, i, tail = sparse_rows(base + shifts, 16, None, 8)
    w = (v - (base + shifts).logsumexp(-1, keepdim=True)).exp()  # (N, K) stored weights, 0 on unused slots
    assert torch.isinf(tail).all()
    assert torch.allclose(w.sum(-1), torch.ones(len(w)), atol=1e-4)
    mean = torch.zeros(C).scatter_add_(0, i.flatten(), w.flatten()) / len(w)
    p = base.softmax(-1)
    assert (mean - p).abs().max() < 2e-3  # 4,000 draws: the average weight of every class is its probability
    head = p.topk(8).indices
    assert torch.allclose(mean[head], p[head], rtol=1e-3)  # the head is exact in every row


def test_the_same_row_draws_the_same_classes_in_any_batch() -> None:
    z = _logits(40)
    s = CacheSettings("float16", 100, 12, sampling=6)
    whole = _arrays(z, s)
    parts = [_arrays(z[a:b], s) for a, b in ((0, 7), (7, 40))]
    for role in whole:
        assert np.array_equal(whole[role], np.concatenate([p[role] for p in parts]))


@pytest.mark.parametrize("settings", [CacheSettings("float16", 100, 16), CacheSettings("bfloat16", 100, 16, 0.9),
                                      CacheSettings("float32", 100, 16, sampling=8)])
def test_compact_frame_round_trips_within_a_step(settings: CacheSettings) -> None:
    z = _logits(50) * 3
    raw = _arrays(z, settings)
    manifest = {"dtype": settings.dtype, "top_k": 16, "index_dtype": "uint16"}
    out = unpack(pack(raw, CacheSettings(**{**settings.__dict__, "encoding": "compact"}))["packed"], manifest)
    a, b = (_floats(x["values"], settings.dtype) for x in (raw, out))
    both = np.isfinite(b)
    assert np.array_equal(out["indices"][both], raw["indices"][both])
    rounding = {"float32": 1e-5, "float16": 0.016, "bfloat16": 0.0625}[settings.dtype]  # |logits| < 32
    assert np.abs(a[both] - b[both]).max() <= 1 / 32 + rounding  # half a step, plus the storage dtype's
    assert (a[~both & np.isfinite(a)] < a[:, :1].repeat(16, 1)[~both & np.isfinite(a)] - 15.8).all()  # joined the tail
    mass = [np.logaddexp(np.logaddexp.reduce(np.where(np.isfinite(v), v, -np.inf), axis=-1), x["tail_lse"])
            for v, x in ((a, raw), (b, out))]
    assert np.abs(mass[0] - mass[1]).max() < 0.03  # the row's total mass is kept


def _floats(stored: np.ndarray, dtype: str) -> np.ndarray:
    from kd_core.cache import decode

    return decode(stored, dtype)


def test_compact_frame_refuses_corruption() -> None:
    s = CacheSettings("float16", 100, 8, encoding="compact")
    frame = pack(_arrays(_logits(10), CacheSettings("float16", 100, 8)), s)["packed"]
    manifest = {"dtype": "float16", "top_k": 8, "index_dtype": "uint16"}
    with pytest.raises(ValueError, match="zstd"):
        unpack(frame[:-5], manifest)
    with pytest.raises(ValueError, match="manifest"):
        unpack(frame, {**manifest, "top_k": 9})


@pytest.mark.parametrize("loss", ["hinton", "reverse_kl", "jsd", "skew_kl"])
def test_divergences_on_rows_of_different_sizes_are_finite(loss: str) -> None:
    z = _logits(32)
    v, i, tail = sparse_rows(z.clone(), 16, 0.5, None)
    teacher = TopKTensors(v, i, tail, C - torch.isfinite(v).sum(-1))
    student = torch.randn(32, C, requires_grad=True)
    for t in (1.0, 2.0):
        kl = sparse_divergence(student, teacher, loss, t, 0.5, 0.1).mean()
        kl.backward()
        assert torch.isfinite(kl) and torch.isfinite(student.grad).all()
        student.grad = None


def test_sampled_loss_gradient_is_unbiased() -> None:
    """E over draws of ∇ forward KL to the sampled row = ∇ cross-entropy to the full teacher."""
    base = _logits(1, seed=5)[0]
    shifts = torch.linspace(0, 1, 3000)[:, None]
    v, i, tail = sparse_rows(base + shifts, 12, None, 8)
    student = torch.zeros(1, C).normal_(generator=torch.Generator().manual_seed(1)).expand(3000, C).clone()
    student.requires_grad_(True)
    topk_kl(student, v, i, tail, C - torch.isfinite(v).sum(-1), 1.0).sum().backward()
    sampled = student.grad.mean(0)
    s = student.detach()[:1].requires_grad_(True)
    forward_kl(base.log_softmax(-1)[None], s.log_softmax(-1)).sum().backward()
    assert (sampled - s.grad[0]).abs().max() < 3e-3


@pytest.mark.parametrize("settings", [CacheSettings("float16", 64, 16, top_p=0.8, encoding="compact"),
                                      CacheSettings("float16", 64, 16, sampling=6, encoding="compact")])
def test_built_sparse_cache_reads_verifies_and_densifies(tmp_path, settings: CacheSettings) -> None:
    z = _logits(200)
    key = cache_key("t", "d", settings)
    rep = build_cache(lambda a, b: z[a:b].clone(), 200, C, tmp_path / "out", tmp_path / "work", key, settings, {})
    assert verify_cache(tmp_path / "out") == []
    cache = LogitCache(tmp_path / "out", key)
    t = cache.take_topk(np.arange(200))
    assert (t.argmax() == z.argmax(-1).numpy()).all()
    dense = cache.take(np.arange(200))
    assert (dense.argmax(-1) == z.argmax(-1).numpy()).all()
    p = torch.from_numpy(dense).softmax(-1)
    assert torch.allclose(p.sum(-1), torch.ones(200), atol=1e-4)
    raw = 16 * 4 + 4
    assert rep.bytes_per_row < raw  # the compact frame is smaller than the raw arrays
    f = next((tmp_path / "out").glob("shard-00001.packed.npy"))
    data = f.read_bytes()
    f.unlink()
    f.write_bytes(data[:-3] + b"\0\0\0")
    assert any("checksum" in p for p in verify_cache(tmp_path / "out"))


def test_decoded_compact_shards_stay_within_the_budget(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kd_core.cache import reader

    s = CacheSettings("float16", 20, 8, encoding="compact")
    z = _logits(200)
    key = cache_key("t", "d", s)
    build_cache(lambda a, b: z[a:b].clone(), 200, C, tmp_path / "out", tmp_path / "work", key, s, {})
    one_shard = 20 * (8 * 2 + 8 * 2 + 4)  # float16 values, uint16 indices, float32 tail
    monkeypatch.setattr(reader, "IN_MEMORY_MAX_BYTES", 3 * one_shard)
    cache = LogitCache(tmp_path / "out", key)
    whole = cache.take_topk(np.arange(200))  # touches all 10 shards
    assert len(cache._decoded) == 3 and sum(cache._decoded.values()) <= 3 * one_shard
    again = cache.take_topk(np.arange(200)[::-1])
    assert np.array_equal(again.values, whole.values[::-1]) and np.array_equal(again.indices, whole.indices[::-1])
