"""The compact shard encoding (`cache.encoding: compact`): a top-k shard's values, indices and tail
in one zstd frame, ~4-8x smaller than the raw arrays.

A row is stored relative to its own maximum, which is all softmax at any temperature needs besides
the maximum itself: the maximum in the cache's dtype, then each further kept value as its distance
below the maximum in steps of 1/16 nat (uint8, capped at 254 steps ≈ 15.9 nats: a class e^-15.9
times less likely than the top one), the tail's log-sum-exp as float16 relative to the maximum, and
the number of slots used. The rounding moves a log-probability by at most 1/32 nat, a KL of at most
~1e-4 nats per row (`bench/cache_size.py` measures it). Values are sorted, so the steps are
delta-coded; indices are split into byte planes; zstd takes the rest. The frame decodes back to the
raw roles' arrays and dtypes, so the reader, `kd cache verify` and the losses see one format.
"""

from __future__ import annotations

import numpy as np
import zstandard

from kd_core.cache.format import PACKED, CacheSettings, decode, storage_dtype

STEP = 16  # quantization steps per nat
MAX_STEPS = 254
LEVEL = 10  # zstd level: ~4x faster than the teacher forward it follows at a few % more bytes than 19
_MAGIC = b"KDC1"


def _rel_steps(values: np.ndarray, tail: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(slots used, uint8 steps below the row maximum delta-coded along the row, tail log-sum-exp).

    A kept value more than MAX_STEPS below its row's maximum joins the tail (its mass added to the
    tail's log-sum-exp): the row's total mass is kept, the class is no longer told apart.
    """
    v = decode(values, dtype)  # (B, K) float32, -inf in unused slots
    top = v[:, :1]
    steps = np.rint((top - np.where(np.isfinite(v), v, top)) * STEP)  # (B, K) non-decreasing along a row
    keep = np.isfinite(v) & (steps <= MAX_STEPS)
    keep[:, 0] = True
    gone = np.where(keep, -np.inf, v)
    if np.isfinite(gone).any():
        tail = np.logaddexp(tail, np.logaddexp.reduce(gone.astype(np.float64), axis=-1)).astype(np.float32)
    steps = np.where(keep, steps, 0).astype(np.uint8)
    deltas = np.diff(steps, axis=-1, prepend=0).astype(np.uint8)
    deltas[~keep] = 0
    return keep.sum(axis=-1).astype(np.uint8), deltas, tail


def pack(arrays: dict[str, np.ndarray], settings: CacheSettings) -> dict[str, np.ndarray]:
    """A shard's raw top-k arrays -> {PACKED: uint8 zstd frame} plus its feature arrays unchanged."""
    values, indices, tail = arrays["values"], arrays["indices"], arrays["tail_lse"]
    rows, k = values.shape
    if k > 255:
        raise ValueError(f"the compact encoding keeps at most 255 classes per row, not {k}")
    used, deltas, tail = _rel_steps(values, tail, settings.dtype)
    top = values[:, 0].copy()
    top32 = decode(top[:, None], settings.dtype)[:, 0]
    tail_rel = (tail - top32).astype(np.float16)  # -inf stays -inf
    idx = np.where(np.arange(k)[None, :] < used[:, None], indices, 0).astype(indices.dtype)
    planes = idx.view(np.uint8).reshape(rows, k, idx.itemsize).transpose(2, 0, 1)  # byte planes
    header = _MAGIC + np.array([rows, k], dtype=np.uint32).tobytes()
    body = b"".join(np.ascontiguousarray(a).tobytes() for a in (top, used, tail_rel, deltas, planes))
    frame = zstandard.ZstdCompressor(level=LEVEL).compress(header + body)
    return {PACKED: np.frombuffer(frame, dtype=np.uint8)} | {r: a for r, a in arrays.items()
                                                          if r not in ("values", "indices", "tail_lse")}


def _take(buf: memoryview, at: int, dtype: np.dtype, count: int) -> tuple[np.ndarray, int]:
    n = count * dtype.itemsize
    if at + n > len(buf):
        raise ValueError("packed shard is truncated")
    return np.frombuffer(buf[at:at + n], dtype=dtype).copy(), at + n


def unpack(frame: np.ndarray, manifest: dict) -> dict[str, np.ndarray]:
    """A packed shard -> {values, indices, tail_lse} in the raw roles' dtypes; ValueError if malformed."""
    try:
        raw = memoryview(zstandard.ZstdDecompressor().decompress(frame.tobytes()))
    except zstandard.ZstdError as exc:
        raise ValueError(f"not a zstd frame ({exc})") from None
    if bytes(raw[:4]) != _MAGIC:
        raise ValueError("not a compact cache shard")
    rows, k = (int(n) for n in np.frombuffer(raw[4:12], dtype=np.uint32))
    store, index = storage_dtype(manifest["dtype"]), np.dtype(manifest["index_dtype"])
    at = 12
    top, at = _take(raw, at, store, rows)
    used, at = _take(raw, at, np.dtype(np.uint8), rows)
    tail_rel, at = _take(raw, at, np.dtype(np.float16), rows)
    deltas, at = _take(raw, at, np.dtype(np.uint8), rows * k)
    planes, at = _take(raw, at, np.dtype(np.uint8), rows * k * index.itemsize)
    if at != len(raw) or k != manifest.get("top_k") or (used > k).any() or (used < 1).any():
        raise ValueError(f"packed shard of {rows}x{k} does not match its manifest")
    return _decoded(top, used, tail_rel, deltas.reshape(rows, k), planes, index, manifest["dtype"])


def _decoded(top: np.ndarray, used: np.ndarray, tail_rel: np.ndarray, deltas: np.ndarray, planes: np.ndarray,
             index: np.dtype, dtype: str) -> dict[str, np.ndarray]:
    rows, k = deltas.shape
    top32 = decode(top[:, None], dtype)  # (B, 1)
    slot = np.arange(k)[None, :] < used[:, None]
    v = np.where(slot, top32 - np.cumsum(deltas, axis=-1, dtype=np.int32) / STEP, -np.inf).astype(np.float32)
    idx = np.ascontiguousarray(planes.reshape(index.itemsize, rows, k).transpose(1, 2, 0)).view(index)[..., 0]
    idx = np.where(slot, idx, idx[:, :1])  # unused slots repeat the first class, as in a raw shard
    values = _stored(v, dtype)
    return {"values": values, "indices": idx, "tail_lse": (top32[:, 0] + tail_rel.astype(np.float32))}


def _stored(v: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> the cache's storage dtype (bfloat16 as its bits)."""
    import torch

    t = torch.from_numpy(v)
    if dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16).numpy()
    return t.to({"float16": torch.float16, "float32": torch.float32}[dtype]).numpy()
