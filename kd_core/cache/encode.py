"""Encoding teacher outputs where they were computed, then one copy to the host.

A teacher on a GPU produces (B, C) logits at millions of rows a second; copying them to the host
before reducing them is what made the cache ~300× slower than the teacher (issue 15). So top-k,
the tail's log-sum-exp, the storage dtype and the finiteness check all run on the logits' device
(`encode_batch`, no host sync: it even runs on PyTorch's data-less `meta` device), and only the
encoded arrays cross to the host (`to_host`): on CUDA through pinned buffers on a side stream, so
the copy overlaps the next batch's forward; the writer thread waits for that copy, not the teacher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch

from kd_core.cache.compact import pack
from kd_core.cache.format import CacheSettings, Features, clamp_tail, feature_role, index_dtype
from kd_core.cache.sparse import clamp_tail_rows, sparse_rows
from kd_core.errors import UserError

_TORCH_STORAGE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.int16}  # bf16 as its bits


@dataclass(frozen=True)
class Encoded:
    """One range of cache rows encoded on the device the teacher ran on, ready to copy to the host."""

    arrays: dict[str, torch.Tensor]  # role -> (B, ...) in its storage dtype (uint16 indices as int16 bits)
    nonfinite: torch.Tensor  # () int64: non-finite logits and features, checked once on the host
    row_min: torch.Tensor | None  # (B,) float32 smallest kept value as stored (top-k): host-side tail clamp;
    # None where the tail was clamped on the device already (rows of different sizes: top_p, sampling)

    @property
    def rows(self) -> int:
        return len(next(iter(self.arrays.values())))

    def take(self, order: torch.Tensor) -> Encoded:
        """Rows in `order` (e.g. back from length order to cache order).  # (B,) int64"""
        order = order.to(self.nonfinite.device)
        return Encoded({r: a[order] for r, a in self.arrays.items()}, self.nonfinite,
                       None if self.row_min is None else self.row_min[order])


def _store(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Float tensor -> its storage dtype on its own device; bfloat16 as its 16-bit pattern (numpy has none)."""
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16)
    return x.to(_TORCH_STORAGE[dtype])


def _floats(stored: torch.Tensor, dtype: str) -> torch.Tensor:
    """Stored values as float32 again (bfloat16 from its bit pattern)."""
    return (stored.view(torch.bfloat16) if dtype == "bfloat16" else stored).float()


def _nonfinite(x: torch.Tensor) -> torch.Tensor:
    return (~torch.isfinite(x)).sum()  # () stays on the device: no sync


def encode_batch(logits: torch.Tensor, feats: Features, settings: CacheSettings, n_classes: int,
                 consume: bool = False) -> Encoded:
    """Raw logits (B, C) and features [(B, *S)] -> one shard's arrays, computed on their device.

    `consume`: the caller owns `logits` (a fresh teacher output), so the tail is masked in place
    instead of in a second (B, C) buffer. Values keep the teacher's precision until stored (a bf16
    autocast logit is exact in float16 within its range); the tail's log-sum-exp is taken in float32.
    """
    if logits.dim() != 2 or logits.shape[1] != n_classes:
        raise UserError(f"teacher returned logits of shape {tuple(logits.shape)}, expected (rows, {n_classes})")
    bad = torch.zeros((), dtype=torch.int64, device=logits.device)
    for f in feats:
        bad = bad + _nonfinite(f)
    out = {feature_role(j): _store(f.float(), settings.dtype) for j, f in enumerate(feats)}
    if not settings.top_k:  # stored: a raw inf or NaN stays one, a float16 overflow becomes inf
        stored = _store(logits, settings.dtype)
        return Encoded({"logits": stored, **out}, bad + _nonfinite(_floats(stored, settings.dtype)), None)
    small = index_dtype(n_classes) == np.uint16  # int16 bits on the device: numpy views them as uint16
    if settings.sparse:
        bad = bad + _nonfinite(logits)
        values, indices, tail_lse = sparse_rows(logits, settings.top_k, settings.top_p, settings.sampling, consume)
        stored = _store(values, settings.dtype)
        as_stored = _floats(stored, settings.dtype)
        bad = bad + _nonfinite(as_stored.masked_fill(values == float("-inf"), 0.0))  # unused slots hold -inf
        return Encoded({"values": stored, "indices": indices.to(torch.int16 if small else torch.int32),
                        "tail_lse": clamp_tail_rows(tail_lse, as_stored, n_classes), **out}, bad, None)
    values, indices = logits.topk(settings.top_k, dim=-1)  # (B, K'), (B, K') sorted: deterministic bytes
    stored = _store(values, settings.dtype)
    as_stored = _floats(stored, settings.dtype)  # (B, K') what the reader will see
    overflow = _nonfinite(as_stored) - _nonfinite(values)
    bad = bad + _nonfinite(logits) + overflow
    if n_classes > settings.top_k:
        tail = logits.scatter_(-1, indices, float("-inf")) if consume else logits.scatter(-1, indices, float("-inf"))
        tail_lse = torch.logsumexp(tail.float(), dim=-1)  # (B,)
    else:
        tail_lse = torch.full((len(logits),), float("-inf"), device=logits.device)
    row_min = as_stored.amin(dim=-1)
    return Encoded({"values": stored, "indices": indices.to(torch.int16 if small else torch.int32),
                    "tail_lse": tail_lse, **out}, bad, row_min)


def concat(parts: list[Encoded]) -> Encoded:
    """Batches of one range, in order, as one Encoded (on their device)."""
    if len(parts) == 1:
        return parts[0]
    # every batch of a range has row minima when the first has (the same settings encoded them)
    rmin = None if parts[0].row_min is None else torch.cat(cast("list[torch.Tensor]", [p.row_min for p in parts]))
    return Encoded({r: torch.cat([p.arrays[r] for p in parts]) for r in parts[0].arrays},
                   torch.stack([p.nonfinite for p in parts]).sum(), rmin)


# (start, stop) -> raw logits (B, C), with features, or already encoded on the teacher's device
Compute = Callable[[int, int], "torch.Tensor | tuple[torch.Tensor, Features] | Encoded"]

_COPY_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


@dataclass
class Host:
    """Encoded rows on their way to the host: `arrays()` waits for the copy and checks them."""

    tensors: dict[str, torch.Tensor]  # (pinned) host tensors, filled by an asynchronous copy
    nonfinite: torch.Tensor
    row_min: torch.Tensor | None
    event: torch.cuda.Event | None  # recorded after the copy on the copy stream; None: already on the host

    def arrays(self, settings: CacheSettings, n_classes: int, rows: tuple[int, int]) -> dict[str, np.ndarray]:
        """The shard's numpy arrays, by role, once the copy is done; refuses non-finite teacher output."""
        if self.event is not None:
            self.event.synchronize()
        if bad := int(self.nonfinite):
            raise UserError(f"teacher returned {bad} non-finite value(s) (logits or features) for rows "
                            f"{rows[0]}:{rows[1]}; nothing cached")
        out = {r: t.numpy() for r, t in self.tensors.items()}
        if settings.top_k:
            if index_dtype(n_classes) == np.uint16:
                out["indices"] = out["indices"].view(np.uint16)
            if self.row_min is not None:  # else clamped on the device (rows of different sizes)
                out["tail_lse"] = clamp_tail(self.row_min.numpy(), out["tail_lse"], n_classes - settings.top_k)
        return pack(out, settings) if settings.encoding == "compact" else out


def release_pinned() -> None:
    """Give back the pinned host buffers torch's allocator keeps (rounded up to powers of two, never
    freed by itself): a dense cache of a large vocabulary would otherwise lock GiBs for the process."""
    if torch.cuda.is_available() and hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()


def to_host(enc: Encoded) -> Host:
    """Start copying `enc` to the host. CUDA: pinned buffers filled on a side stream, so the next
    forward pass is queued at once; other devices (MPS) copy synchronously; CPU tensors stay put."""
    tensors = dict(enc.arrays)
    small = [enc.nonfinite] + ([enc.row_min] if enc.row_min is not None else [])
    device = enc.nonfinite.device
    if device.type == "cpu":
        return Host(tensors, enc.nonfinite, enc.row_min, None)
    if device.type != "cuda":
        host = [t.cpu() for t in [*tensors.values(), *small]]
        return Host(dict(zip(tensors, host, strict=False)), host[len(tensors)],
                    host[len(tensors) + 1] if enc.row_min is not None else None, None)
    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    stream = _COPY_STREAMS[device]
    stream.wait_stream(torch.cuda.current_stream(device))  # the copy starts once the encode is done
    host = []
    with torch.cuda.stream(stream):
        for t in [*tensors.values(), *small]:
            h = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            h.copy_(t, non_blocking=True)
            t.record_stream(stream)  # the caching allocator keeps t until the copy has read it
            host.append(h)
        event = torch.cuda.Event(blocking=True)  # the writer sleeps on it instead of spinning a core
        event.record(stream)
    return Host(dict(zip(tensors, host, strict=False)), host[len(tensors)],
                host[len(tensors) + 1] if enc.row_min is not None else None, event)
