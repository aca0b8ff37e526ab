"""The soft-label cache: the teacher's raw logits on disk, tied to the teacher and data that made them.

Layout of a cache directory::

    manifest.json        format, key, dtype, rows, classes, shards [{file, start, stop, sha256}]
    shard-00000.npy      raw logits rows [start, stop) as a plain .npy (memory-mappable)

Raw logits (not probabilities) are stored, so any temperature can be applied later. The cache key
hashes the teacher fingerprint, the data fingerprint and the cache settings, so a changed teacher or
changed data can never be served stale soft labels. Shards are computed into a work directory that
survives crashes (DVC deletes a stage's outputs before re-running it), each written to a temporary
name and renamed when complete; a re-run keeps every shard whose checksum verifies and computes only
the missing ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kd_core.errors import UserError
from kd_core.stages import atomic_dir

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}  # bf16 kept as its bits

Compute = Callable[[int, int], torch.Tensor]  # (start, stop) -> raw logits (stop - start, K)


@dataclass(frozen=True)
class CacheSettings:
    dtype: str
    shard_rows: int

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "shard_rows": self.shard_rows}


def cache_key(teacher_fingerprint: str, data_fingerprint: str, settings: CacheSettings) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, "teacher": teacher_fingerprint,
                       "data": data_fingerprint, "settings": settings.to_json()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def shard_ranges(n_rows: int, shard_rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_rows, n_rows)) for s in range(0, n_rows, shard_rows)]


def encode(logits: torch.Tensor, dtype: str) -> np.ndarray:
    """Tensor -> storage array; bfloat16 has no numpy dtype, so its 16-bit pattern is stored as int16."""
    if dtype == "bfloat16":
        return logits.to(torch.bfloat16).view(torch.int16).cpu().numpy()
    return logits.to(getattr(torch, dtype)).cpu().numpy()


def decode(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Storage array -> float32 logits.  # (B, K)"""
    if dtype == "bfloat16":
        return torch.from_numpy(np.array(stored)).view(torch.bfloat16).float().numpy()  # copy: writable
    return np.asarray(stored, dtype=np.float32)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_shard(path: Path, arr: np.ndarray) -> str:
    """Write a shard via a temporary name + fsync + rename; return its sha256 (also in a sidecar)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        np.save(f, arr)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    digest = sha256_file(path)
    side = path.with_name(path.name + ".sha256")
    side_tmp = side.with_name(side.name + ".tmp")
    side_tmp.write_text(digest)
    os.replace(side_tmp, side)
    return digest


def _verified_digest(path: Path) -> str | None:
    """The shard's sha256 if it is complete and matches its sidecar, else None (recompute it)."""
    side = path.with_name(path.name + ".sha256")
    if not path.exists() or not side.exists():
        return None
    digest = sha256_file(path)
    return digest if digest == side.read_text().strip() else None


@dataclass(frozen=True)
class CacheReport:
    key: str
    rows: int
    classes: int
    shards: int
    computed: int  # shards computed in this call
    reused: int  # shards kept from an interrupted earlier call
    unchanged: bool = False  # the output already held a verified cache with this key


def _existing(out: Path, key: str) -> dict | None:
    """A complete, verified cache with this key already in place, else None."""
    try:
        manifest = read_manifest(out)
    except UserError:
        return None
    if manifest.get("key") != key or verify_cache(out):
        return None
    return manifest


def build_cache(compute: Compute, n_rows: int, n_classes: int, out: Path, work: Path, key: str,
                settings: CacheSettings, meta: dict) -> CacheReport:
    """Compute (or resume) every shard, then publish shards + manifest into `out` atomically."""
    ranges = shard_ranges(n_rows, settings.shard_rows)
    existing = _existing(out, key)
    if existing is not None:
        return CacheReport(key, n_rows, n_classes, len(ranges), 0, len(ranges), unchanged=True)
    work_dir = work / "cache" / key
    work_dir.mkdir(parents=True, exist_ok=True)
    shards, computed = [], 0
    for i, (start, stop) in enumerate(ranges):
        path = work_dir / f"shard-{i:05d}.npy"
        digest = _verified_digest(path)
        if digest is None:
            arr = encode(compute(start, stop), settings.dtype)  # (stop - start, K)
            if arr.shape != (stop - start, n_classes):
                raise UserError(f"teacher returned logits of shape {arr.shape} for rows {start}:{stop}, "
                                f"expected {(stop - start, n_classes)}")
            digest = _write_shard(path, arr)
            computed += 1
        shards.append({"file": path.name, "start": start, "stop": stop, "sha256": digest})
    manifest = {"format": FORMAT_VERSION, "key": key, "dtype": settings.dtype,
                "storage_dtype": np.dtype(_STORAGE[settings.dtype]).name, "rows": n_rows,
                "classes": n_classes, "shard_rows": settings.shard_rows, "shards": shards, **meta}
    with atomic_dir(out) as tmp:
        for s in shards:
            _link_or_copy(work_dir / s["file"], tmp / s["file"])
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(work_dir, ignore_errors=True)
    return CacheReport(key, n_rows, n_classes, len(ranges), computed, len(ranges) - computed)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # same filesystem: publishing costs no copy
    except OSError:
        shutil.copy2(src, dst)


def read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    if not mpath.exists():
        raise UserError(f"{path} holds no logit cache ({MANIFEST} missing): run the cache_logits stage")
    try:
        manifest = json.loads(mpath.read_text())
    except ValueError as exc:
        raise UserError(f"{mpath} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise UserError(f"{mpath}: cache format {manifest.get('format')!r}, this kd reads {FORMAT_VERSION}")
    return manifest


def verify_cache(path: Path) -> list[str]:
    """Every problem found: checksums, row ranges, shapes, dtypes and finite values. Empty = sound."""
    manifest = read_manifest(path)
    problems, expected_start = [], 0
    storage = np.dtype(_STORAGE.get(manifest.get("dtype"), np.float32))
    for s in manifest["shards"]:
        f = path / s["file"]
        if s["start"] != expected_start:
            problems.append(f"{f}: starts at row {s['start']}, expected {expected_start}")
        expected_start = s["stop"]
        if not f.exists():
            problems.append(f"{f}: missing")
            continue
        if sha256_file(f) != s["sha256"]:
            problems.append(f"{f}: checksum mismatch (corrupted or modified)")
            continue
        arr = np.load(f, mmap_mode="r", allow_pickle=False)
        if arr.shape != (s["stop"] - s["start"], manifest["classes"]) or arr.dtype != storage:
            problems.append(f"{f}: shape {arr.shape} dtype {arr.dtype}, expected "
                            f"{(s['stop'] - s['start'], manifest['classes'])} {storage}")
            continue
        bad = int((~np.isfinite(decode(arr, manifest["dtype"]))).sum())
        if bad:
            problems.append(f"{f}: {bad} non-finite logit(s)")
    if expected_start != manifest["rows"]:
        problems.append(f"{path}: shards cover {expected_start} rows, manifest says {manifest['rows']}")
    return problems


@dataclass
class LogitCache:
    """Read side: memory-mapped shards, each checksum-verified once before its first use."""

    path: Path
    expected_key: str | None = None
    manifest: dict = field(init=False)
    _shards: dict[int, np.ndarray] = field(init=False, default_factory=dict)

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

    def _shard(self, i: int) -> np.ndarray:
        if i not in self._shards:
            s = self.manifest["shards"][i]
            f = self.path / s["file"]
            if not f.exists() or sha256_file(f) != s["sha256"]:
                raise UserError(f"{f}: checksum mismatch or missing; the cache is corrupt: "
                                "run `kd cache verify` and re-run the cache_logits stage")
            self._shards[i] = np.load(f, mmap_mode="r", allow_pickle=False)
        return self._shards[i]

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows `idx` (global row numbers) as float32 logits.  # (B,) -> (B, K)"""
        out = np.empty((len(idx), self.classes), dtype=np.float32)
        which = np.searchsorted(self._starts, idx, side="right") - 1  # (B,)
        for i in np.unique(which):
            sel = which == i
            out[sel] = decode(self._shard(int(i))[idx[sel] - self._starts[i]], self.manifest["dtype"])
        return out
