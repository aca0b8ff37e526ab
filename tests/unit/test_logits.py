"""The soft-label cache: round trip, keys, stale refusal, resume and verification."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_core.cache import CacheSettings, LogitCache, build_cache, cache_key, verify_cache
from kd_core.cache import reader as cache_reader
from kd_core.errors import UserError


def _teacher_logits(n: int = 1000, k: int = 7) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, k, generator=g) * 5


def _build(tmp_path, logits, dtype="float32", shard_rows=300, compute=None, top_k=None):
    settings = CacheSettings(dtype, shard_rows, top_k)
    key = cache_key("teacher", "data", settings)
    compute = compute or (lambda a, b: logits[a:b])
    report = build_cache(compute, len(logits), logits.shape[1], tmp_path / "cache", tmp_path / "work",
                         key, settings, {"teacher_fingerprint": "teacher"})
    return report, key


@pytest.fixture(params=["in_memory", "mmap"])
def read_path(request, monkeypatch):
    """Both read paths of a dense cache: read whole into RAM, and gathered from the memory maps."""
    if request.param == "mmap":
        monkeypatch.setattr(cache_reader, "IN_MEMORY_MAX_BYTES", 0)
    return request.param


@pytest.mark.parametrize("dtype,tol", [("float32", 0), ("float16", 1e-2), ("bfloat16", 5e-2)])
def test_round_trip_per_dtype(tmp_path, dtype, tol, read_path):
    logits = _teacher_logits()
    report, key = _build(tmp_path, logits, dtype)
    assert (report.shards, report.computed) == (4, 4)
    cache = LogitCache(tmp_path / "cache", key)
    idx = np.array([999, 0, 300, 299, 512])
    got = cache.take(idx)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, logits[idx].numpy(), rtol=tol, atol=tol * 10)
    assert verify_cache(tmp_path / "cache") == []


def test_key_depends_on_teacher_data_and_settings():
    s = CacheSettings("float32", 100)
    base = cache_key("t", "d", s)
    assert base != cache_key("t2", "d", s)
    assert base != cache_key("t", "d2", s)
    assert base != cache_key("t", "d", CacheSettings("float16", 100))


def test_stale_cache_is_refused(tmp_path):
    _build(tmp_path, _teacher_logits())
    with pytest.raises(UserError, match="another teacher or other data"):
        LogitCache(tmp_path / "cache", "0" * 64)


def test_same_key_does_nothing(tmp_path):
    logits = _teacher_logits()
    _build(tmp_path, logits)
    report, _ = _build(tmp_path, logits, compute=lambda a, b: pytest.fail("teacher ran again"))
    assert report.unchanged


def test_resume_keeps_finished_shards_and_is_byte_identical(tmp_path):
    logits = _teacher_logits()
    calls = []

    def crashing(a, b):
        if a >= 600:
            raise KeyboardInterrupt  # simulated crash after two shards
        calls.append(a)
        return logits[a:b]

    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "crash", logits, compute=crashing)
    report, _ = _build(tmp_path / "crash", logits)
    assert (report.computed, report.reused) == (2, 2)
    _build(tmp_path / "clean", logits)
    for f in sorted((tmp_path / "clean" / "cache").iterdir()):
        assert f.read_bytes() == (tmp_path / "crash" / "cache" / f.name).read_bytes(), f.name


def test_flipped_byte_is_caught(tmp_path, read_path):
    _, key = _build(tmp_path, _teacher_logits())
    shard = tmp_path / "cache" / "shard-00001.logits.npy"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF
    shard.write_bytes(bytes(raw))
    problems = verify_cache(tmp_path / "cache")
    assert len(problems) == 1 and "shard-00001" in problems[0] and "checksum" in problems[0]
    cache = LogitCache(tmp_path / "cache", key)
    if read_path == "mmap":
        cache.take(np.array([0]))  # an intact shard still reads; in RAM the whole cache is checked at once
    with pytest.raises(UserError, match="checksum"):
        cache.take(np.array([350]))


def test_non_finite_teacher_logits_are_refused(tmp_path):
    logits = _teacher_logits()
    logits[5, 2] = float("inf")
    with pytest.raises(UserError, match="non-finite"):
        _build(tmp_path, logits)
    assert not (tmp_path / "cache").exists()  # nothing published


def test_flipped_byte_is_rebuilt_on_rerun(tmp_path):
    logits = _teacher_logits()
    _build(tmp_path, logits)
    shard = tmp_path / "cache" / "shard-00002.logits.npy"
    clean = shard.read_bytes()
    raw = bytearray(clean)
    raw[200] ^= 0x01
    shard.write_bytes(bytes(raw))  # in place: the published file and the store share the inode
    calls = []
    report, _ = _build(tmp_path, logits, compute=lambda a, b: calls.append(a) or logits[a:b])
    assert calls == [600] and (report.computed, report.reused) == (1, 3)
    assert shard.read_bytes() == clean and verify_cache(tmp_path / "cache") == []


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_topk_round_trip_and_tail(tmp_path, dtype):
    logits = _teacher_logits(500, 20)
    _, key = _build(tmp_path, logits, dtype=dtype, top_k=4)
    cache = LogitCache(tmp_path / "cache", key)
    idx = np.array([7, 499, 0, 301])
    t = cache.take_topk(idx)
    vals, ids = logits[idx].topk(4, dim=-1)
    tol = {"float32": 1e-6, "float16": 1e-2, "bfloat16": 5e-2}[dtype]
    np.testing.assert_allclose(t.values, vals.numpy(), rtol=tol, atol=tol * 10)
    np.testing.assert_array_equal(t.indices, ids.numpy())
    tail = logits[idx].scatter(-1, ids, float("-inf")).logsumexp(-1)
    np.testing.assert_allclose(t.tail_lse, tail.numpy(), rtol=1e-5)
    assert t.n_tail == 16
    # the dense view keeps the total probability mass at T = 1 (equal-logit tail)
    dense = torch.from_numpy(cache.take(idx))
    np.testing.assert_allclose(dense.logsumexp(-1).numpy(), logits[idx].logsumexp(-1).numpy(), rtol=tol, atol=tol * 10)
    assert verify_cache(tmp_path / "cache") == []


def test_topk_larger_than_classes_is_refused(tmp_path):
    with pytest.raises(UserError, match="top_k"):
        _build(tmp_path, _teacher_logits(100, 5), top_k=6)


def test_store_lists_and_collects(tmp_path):
    from kd_core.cache import gc_store, list_store

    logits = _teacher_logits()
    _, key = _build(tmp_path, logits)
    _build(tmp_path, logits, dtype="float16")
    stored = list_store(tmp_path / "work")
    assert len(stored) == 2 and all(c.complete for c in stored)
    removed, busy = gc_store(tmp_path / "work", keep={key})
    assert [c.key for c in removed] != [key] and len(removed) == 1 and busy == []
    assert [c.key for c in list_store(tmp_path / "work")] == [key]
    assert verify_cache(tmp_path / "cache") == []  # the published cache is untouched by gc


def test_gc_keeps_a_cache_whose_build_holds_the_lock(tmp_path):
    """A build in progress (another process holding its key's lock) is never collected."""
    from kd_core.cache import gc_store, key_lock, list_store

    _, key = _build(tmp_path, _teacher_logits())
    with key_lock(tmp_path / "work", key):  # as build_cache holds it while it computes shards
        assert [c.building for c in list_store(tmp_path / "work")] == [True]  # `kd cache ls` says so
        removed, busy = gc_store(tmp_path / "work", keep=set())
    assert removed == [] and [c.key for c in busy] == [key]
    assert [c.building for c in list_store(tmp_path / "work")] == [False]
    assert [c.key for c in list_store(tmp_path / "work")] == [key]
    removed, busy = gc_store(tmp_path / "work", keep=set())  # released: now it goes
    assert [c.key for c in removed] == [key] and busy == [] and list_store(tmp_path / "work") == []


def test_gc_keeps_the_lock_file_a_waiting_build_holds_open(tmp_path):
    """A build waiting on a key's lock has its file open and locks it once gc lets go. Had gc unlinked
    the file, the next gc would lock a new file of the same name and delete the cache being rebuilt."""
    import fcntl

    from kd_core.cache import gc_store
    from kd_core.cache.store import _lock_file

    work = tmp_path / "work"
    _, key = _build(tmp_path, _teacher_logits())
    fd = os.open(_lock_file(work, key), os.O_RDWR)  # the waiting build
    try:
        removed, _ = gc_store(work, keep=set())
        assert [c.key for c in removed] == [key]
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # gc released it: the build takes it and starts again
        (work / "cache" / key).mkdir(parents=True)
        removed, busy = gc_store(work, keep=set())
        assert removed == [] and [c.key for c in busy] == [key]
    finally:
        os.close(fd)


def test_shard_temporaries_are_unique_per_writer(tmp_path, monkeypatch):
    """Two writers of the same shard (two builds of one key on a shared store) never share a temp file."""
    from kd_core.cache import build as cache_build

    names = []
    real = cache_build.os.replace

    def spy(src, dst):
        names.append(Path(src).name)
        real(src, dst)

    monkeypatch.setattr(cache_build.os, "replace", spy)
    arr = np.zeros((4, 3), np.float32)
    cache_build.write_shard(tmp_path, 0, {"logits": arr})
    cache_build.write_shard(tmp_path, 0, {"logits": arr})
    shard_temps = [n for n in names if n.startswith("shard-00000.logits.npy.") and n.endswith(".tmp")]
    assert len(shard_temps) == 2 and len(set(shard_temps)) == 2
