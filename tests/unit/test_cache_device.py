"""The cache's device path (issue 15), run on the CPU as CI has no GPU: encoding happens where the
logits are without a host sync, index width follows the vocabulary, the teacher's way of computing
is recorded and never mixed on resume, and a multi-GPU Dask cluster needs dask-cuda."""

import json

import numpy as np
import pytest
import torch

from kd_core.cache import (
    CacheSettings,
    LogitCache,
    build_cache,
    bytes_per_row,
    cache_key,
    cluster,
    concat,
    encode_batch,
    index_dtype,
    to_host,
    verify_cache,
)
from kd_core.errors import UserError


def _logits(n: int, c: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, c, generator=torch.Generator().manual_seed(seed)) * 4


def _build(tmp_path, compute, n, c, settings, autocast=None, name="cache"):
    return build_cache(compute, n, c, tmp_path / name, tmp_path / "work", cache_key("t", "d", settings), settings,
                       {}, autocast=autocast)


def _files(path):
    return {f.name: f.read_bytes() for f in sorted(path.iterdir())}


@pytest.mark.parametrize("top_k", [None, 5])
def test_encoding_runs_on_a_data_less_device(top_k):
    """On `meta` tensors any host sync (.item(), .numpy(), bool()) raises: the encode path has none."""
    settings = CacheSettings("bfloat16", 16, top_k, (("m", "none"),))
    enc = encode_batch(torch.randn(8, 70_000, device="meta"), [torch.randn(8, 3, device="meta")], settings, 70_000)
    assert {t.device.type for t in enc.arrays.values()} == {"meta"}
    assert enc.nonfinite.device.type == "meta" and enc.rows == 8
    if top_k:
        assert enc.arrays["indices"].dtype == torch.int32  # 70,000 classes do not fit 16 bits
        assert enc.row_min.shape == (8,)
    concat([enc, enc]).take(torch.arange(16).flip(0))  # (B,) reorder on the device too


def test_encode_never_converts_a_device_tensor_to_numpy(monkeypatch):
    """`.numpy()` is only ever called on host tensors, after the copy (the CUDA-logits crash)."""
    real = torch.Tensor.numpy
    devices = []

    def spy(self, *a, **k):
        devices.append(self.device.type)
        return real(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "numpy", spy)
    settings = CacheSettings("float16", 64, 4)
    enc = encode_batch(_logits(64, 50), [], settings, 50)
    assert devices == []  # encoding made no host arrays
    to_host(enc).arrays(settings, 50, (0, 64))
    assert devices and set(devices) == {"cpu"}


@pytest.mark.parametrize("classes,dtype", [(65_536, np.uint16), (65_537, np.int32)])
def test_index_width_follows_the_vocabulary(tmp_path, classes, dtype):
    """uint16 up to 65,536 classes (4K + 4 bytes/row with float16), int32 above; the last class survives."""
    logits = _logits(6, classes)
    logits[0, classes - 1] = 100.0  # the highest index is the top class of row 0
    settings = CacheSettings("float16", 4, 8)
    report = _build(tmp_path, lambda a, b: logits[a:b], 6, classes, settings)
    assert index_dtype(classes) == dtype
    assert report.bytes_per_row == bytes_per_row(settings, classes, ()) == 8 * (2 + np.dtype(dtype).itemsize) + 4
    assert np.load(tmp_path / "cache" / "shard-00000.indices.npy").dtype == dtype
    cache = LogitCache(tmp_path / "cache")
    assert cache.manifest["index_dtype"] == np.dtype(dtype).name
    t = cache.take_topk(np.arange(6))
    want = logits.topk(8, dim=-1).indices.numpy()
    np.testing.assert_array_equal(t.indices, want)
    assert t.indices[0, 0] == classes - 1
    assert verify_cache(tmp_path / "cache") == []


@pytest.mark.parametrize("top_k", [None, 3])
def test_encoded_computes_write_the_same_bytes_as_raw_logits(tmp_path, top_k):
    """A compute that encodes per batch itself (the teacher pass) and one returning raw logits agree."""
    logits, settings = _logits(100, 12), CacheSettings("float16", 40, top_k)

    def per_batch(a, b):
        return concat([encode_batch(logits[i:min(i + 7, b)].clone(), [], settings, 12, consume=True)
                       for i in range(a, b, 7)])

    _build(tmp_path, lambda a, b: logits[a:b], 100, 12, settings, name="raw")
    _build(tmp_path / "x", per_batch, 100, 12, settings, name="enc")
    assert _files(tmp_path / "raw") == _files(tmp_path / "x" / "enc")
    assert torch.equal(logits, _logits(100, 12))  # a raw compute's tensor is never modified in place


def test_non_finite_output_found_on_the_host_is_refused(tmp_path):
    logits = _logits(50, 6)
    logits[33, 2] = float("nan")
    with pytest.raises(UserError, match="1 non-finite value.*rows 20:40"):
        _build(tmp_path, lambda a, b: logits[a:b], 50, 6, CacheSettings("float32", 20, 2))


@pytest.mark.parametrize("top_k", [None, 2])
def test_a_logit_that_overflows_float16_is_refused(tmp_path, top_k):
    """70,000 is finite in float32 and bfloat16 but inf in float16: never cached as inf."""
    logits = _logits(50, 6)
    logits[7, 1] = 70_000.0
    with pytest.raises(UserError, match="1 non-finite value.*rows 0:20"):
        _build(tmp_path, lambda a, b: logits[a:b], 50, 6, CacheSettings("float16", 20, top_k))
    _build(tmp_path / "bf16", lambda a, b: logits[a:b], 50, 6, CacheSettings("bfloat16", 20, top_k))


def test_autocast_is_recorded_and_never_mixed_on_resume(tmp_path):
    """Shards a crashed build left in another mode are recomputed; the manifest says how it ran."""
    logits, settings = _logits(90, 5), CacheSettings("float32", 30, None)
    calls = []

    def crashing(a, b):
        calls.append(a)
        if a == 60:
            raise KeyboardInterrupt  # the build dies after two shards
        return logits[a:b]

    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path, crashing, 90, 5, settings)
    same = _build(tmp_path / "same", lambda a, b: logits[a:b], 90, 5, settings)  # control: a fresh store
    assert same.computed == 3
    report = _build(tmp_path, lambda a, b: logits[a:b], 90, 5, settings, autocast="bfloat16")
    assert (report.computed, report.reused) == (3, 0)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["capture"] == {"device": "cpu", "autocast": "bfloat16"}


def test_resume_in_the_same_mode_keeps_finished_shards(tmp_path):
    logits, settings = _logits(90, 5), CacheSettings("float32", 30, None)

    def crashing(a, b):
        if a == 60:
            raise KeyboardInterrupt
        return logits[a:b]

    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path, crashing, 90, 5, settings, autocast="bfloat16")
    report = _build(tmp_path, lambda a, b: logits[a:b], 90, 5, settings, autocast="bfloat16")
    assert (report.computed, report.reused) == (1, 2)


def test_several_gpus_without_dask_cuda_is_one_clear_line(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_dask_cuda(name, *a, **k):
        if name == "dask_cuda":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_dask_cuda)
    with pytest.raises(UserError, match="dask-cuda"):
        cluster.local_cluster(8, gpus=2)


def test_cache_rows_are_found_in_a_length_sorted_multi_position_output():
    """Input rows computed in `order`, P = 3 cache rows each: cache rows 1:7 sit at these positions."""
    from kd_core.cache.teacher import _cache_order

    got = _cache_order(torch.tensor([2, 0, 1]), 3, 1, 7)
    assert got.tolist() == [4, 5, 6, 7, 8, 0]
    assert _cache_order(torch.tensor([1, 0]), 1, 0, 2).tolist() == [1, 0]  # one row each: the inverse order
