"""Reading a cache for training: memory-mapped shards, each checksum-verified before first use.

A top-k cache is read as top-k (`take_topk`, `targets`): the student's loss works on (B, K') values,
indices and a tail bucket, never on a (B, C) teacher row, so memory stays O(B·K') for any vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kd_core.cache.format import PACKED, clamp_tail, decode, is_sparse, read_manifest, read_views, sha256_file
from kd_core.errors import UserError


@dataclass(frozen=True)
class TopKTensors:
    """A batch of top-k soft targets on a device: what `losses.topk_kd` reads instead of (B, C) logits."""

    values: torch.Tensor  # (B, K') float32 raw logits
    indices: torch.Tensor  # (B, K') int64 class indices
    tail_lse: torch.Tensor  # (B,) float32 log-sum-exp of the other logits at T = 1
    n_tail: int | torch.Tensor  # classes outside the top K' (per row (B,) int64 where rows differ: top_p)

    def argmax(self) -> torch.Tensor:
        """The teacher's class per row (the tail never beats a kept logit: format.clamp_tail).  # (B,)"""
        return self.indices.gather(-1, self.values.argmax(dim=-1, keepdim=True))[:, 0]


@dataclass(frozen=True)
class TopK:
    values: np.ndarray  # (B, K') float32 raw logits
    indices: np.ndarray  # (B, K') int64 class indices
    tail_lse: np.ndarray  # (B,) float32 log-sum-exp of the other logits at T = 1
    n_tail: int | np.ndarray  # classes outside the top K' (per row (B,) where rows differ: top_p, sampling)

    def argmax(self) -> np.ndarray:
        """The teacher's class per row.  # (B,)"""
        return np.take_along_axis(self.indices, self.values.argmax(axis=-1)[:, None], axis=-1)[:, 0]

    def to(self, device: torch.device) -> TopKTensors:
        """The batch as tensors on `device`, moved as dense batches are (kd_core.distributed.to_device)."""
        from kd_core.distributed import to_device

        n_tail = self.n_tail if isinstance(self.n_tail, int) else to_device(self.n_tail, device)
        return TopKTensors(to_device(self.values, device), to_device(self.indices, device),
                           to_device(self.tail_lse, device), n_tail)


IN_MEMORY_MAX_BYTES = 1 << 30  # dense caches up to 1 GiB of float32 are read into RAM for training


@dataclass
class LogitCache:
    """Read side: memory-mapped arrays, each checksum-verified once before its first use; a dense
    cache of at most IN_MEMORY_MAX_BYTES is read into RAM whole, as training touches every row anyway."""

    path: Path
    expected_key: str | None = None
    manifest: dict = field(init=False)
    _arrays: dict[tuple[int, str], np.ndarray] = field(init=False, default_factory=dict)
    _dense: np.ndarray | None = field(init=False, default=None)
    _decoded: dict[int, int] = field(init=False, default_factory=dict)  # compact shards held decoded: bytes

    def __post_init__(self) -> None:
        self.manifest = read_manifest(self.path)
        key = self.manifest.get("key")
        if self.expected_key is not None and key != self.expected_key:
            raise UserError(f"logit cache {self.path} was made by another teacher or other data "
                            f"(key {str(key)[:12]}…, current {self.expected_key[:12]}…): "
                            "re-run the cache_logits stage")
        self._starts = np.array([s["start"] for s in self.manifest["shards"]], dtype=np.int64)

    @property
    def rows(self) -> int:
        return int(self.manifest["rows"])

    @property
    def classes(self) -> int:
        return int(self.manifest["classes"])

    @property
    def top_k(self) -> int | None:
        return self.manifest.get("top_k")

    def views(self) -> np.ndarray | None:
        """The stored view parameters of every cache row (checksum-verified), which the student replays;
        None for a cache of plain rows.  # (rows, D) float32"""
        return read_views(self.path, self.manifest)

    def _array(self, i: int, role: str) -> np.ndarray:
        if (i, role) not in self._arrays:
            arrays = self.manifest["shards"][i]["arrays"]
            if role not in arrays and PACKED in arrays:
                self._unpack(i)
                return self._arrays[(i, role)]
            f = self._verified(arrays[role]["file"], arrays[role]["sha256"])
            self._arrays[(i, role)] = np.load(f, mmap_mode="r", allow_pickle=False)
        return self._arrays[(i, role)]

    def _verified(self, file: str, sha256: str) -> Path:
        f = self.path / file
        if not f.exists() or sha256_file(f) != sha256:
            raise UserError(f"{f}: checksum mismatch or missing; the cache is corrupt: "
                            "run `kd cache verify` and re-run the cache_logits stage")
        return f

    def _unpack(self, i: int) -> None:
        """Decode compact shard i into its raw roles' arrays, kept while the decoded shards stay within
        IN_MEMORY_MAX_BYTES (a random batch touches every shard; past the budget the oldest go)."""
        from kd_core.cache.compact import unpack

        a = self.manifest["shards"][i]["arrays"][PACKED]
        f = self._verified(a["file"], a["sha256"])
        try:
            decoded = unpack(np.load(f, allow_pickle=False), self.manifest)
        except ValueError as exc:
            raise UserError(f"{f}: {exc}; run `kd cache verify` and re-run the cache_logits stage") from None
        while self._decoded and sum(self._decoded.values()) + sum(x.nbytes for x in decoded.values()) \
                > IN_MEMORY_MAX_BYTES:
            oldest = next(iter(self._decoded))
            del self._decoded[oldest]
            for role in decoded:
                self._arrays.pop((oldest, role), None)
        self._decoded[i] = sum(x.nbytes for x in decoded.values())
        self._arrays |= {(i, r): x for r, x in decoded.items()}

    def _gather(self, idx: np.ndarray, role: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """(positions in idx, rows of that shard's array) for every shard `idx` touches."""
        which = np.searchsorted(self._starts, idx, side="right") - 1  # (B,)
        order = np.argsort(which, kind="stable")  # one sort instead of a mask per shard: a random batch
        groups = np.split(order, np.flatnonzero(np.diff(which[order])) + 1)  # touches every shard
        return [(sel, self._array(int(which[sel[0]]), role)[idx[sel] - self._starts[which[sel[0]]]])
                for sel in groups if len(sel)]

    def _in_memory(self) -> np.ndarray:
        """Every shard verified and decoded once into one float32 array.  # (N, K)

        A random batch touches every shard, so gathering from the memory maps costs a sort and one
        fancy index per shard each step; a cache that fits in IN_MEMORY_MAX_BYTES is one index instead.
        """
        if self._dense is None:
            self._dense = np.concatenate([decode(self._array(i, "logits"), self.manifest["dtype"])
                                          for i in range(len(self.manifest["shards"]))]).astype(np.float32)
        return self._dense

    @property
    def features(self) -> list[dict]:
        """The manifest's feature entries (module, pool, shape, role), in cache.features order."""
        return self.manifest.get("features", [])

    def take_feature(self, idx: np.ndarray, module: str) -> np.ndarray:
        """Rows `idx` of the teacher feature captured from `module`, as float32.  # (B,) -> (B, *shape)"""
        entry = next((f for f in self.features if f["module"] == module), None)
        if entry is None:
            raise UserError(f"{self.path} holds no feature of teacher module {module!r} "
                            f"(it holds {[f['module'] for f in self.features]}): re-run the cache_logits stage")
        out = np.empty((len(idx), *entry["shape"]), dtype=np.float32)
        for sel, rows in self._gather(idx, entry["role"]):
            out[sel] = decode(rows, self.manifest["dtype"])
        return out

    def take_topk(self, idx: np.ndarray) -> TopK:
        """Rows `idx` of a top-k cache: values, indices and the tail's log-sum-exp.  # (B,) -> (B, K'), (B, K'), (B,)

        The tail is clamped again on read (format.clamp_tail), so caches written before the clamp read alike.
        """
        if not self.top_k:
            raise UserError(f"{self.path} is a dense cache; it has no top-k arrays")
        k = self.top_k
        values, indices = np.empty((len(idx), k), np.float32), np.empty((len(idx), k), np.int64)
        tail = np.empty(len(idx), np.float32)
        for sel, rows in self._gather(idx, "values"):
            values[sel] = decode(rows, self.manifest["dtype"])
        for sel, rows in self._gather(idx, "indices"):
            indices[sel] = rows
        for sel, rows in self._gather(idx, "tail_lse"):
            tail[sel] = rows
        if not is_sparse(self.manifest):
            return TopK(values, indices, clamp_tail(values.min(axis=-1), tail, self.classes - k), self.classes - k)
        finite = np.isfinite(values)  # rows of different sizes: -inf in unused slots, a tail size per row
        n_tail = self.classes - finite.sum(axis=-1)
        row_min = np.where(finite, values, np.inf).min(axis=-1)
        return TopK(values, indices, clamp_tail(row_min, tail, np.maximum(n_tail, 1)), n_tail)

    def targets(self, idx: np.ndarray) -> np.ndarray | TopK:
        """What training reads for rows `idx`: dense logits (B, C), or a top-k cache as TopK (B, K')."""
        return self.take_topk(idx) if self.top_k else self.take(idx)

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows `idx` (global row numbers) as float32 logits.  # (B,) -> (B, K)

        For a top-k cache this densifies (O(B·C)): the tail classes get the equal-logit approximation
        of kd_core/cache/format.py. Training on a top-k cache reads `targets` instead.
        """
        if not self.top_k:
            if self.rows * self.classes * 4 <= IN_MEMORY_MAX_BYTES:
                return self._in_memory()[idx]
            out = np.empty((len(idx), self.classes), dtype=np.float32)
            for sel, rows in self._gather(idx, "logits"):
                out[sel] = decode(rows, self.manifest["dtype"])
            return out
        t = self.take_topk(idx)
        fill = t.tail_lse - np.log(np.maximum(t.n_tail, 1))  # (B,)
        out = np.repeat(fill[:, None], self.classes, axis=1).astype(np.float32)
        kept = np.isfinite(t.values)  # unused slots (-inf, repeating the first class) are left out
        out[np.nonzero(kept)[0], t.indices[kept]] = t.values[kept]
        return out


