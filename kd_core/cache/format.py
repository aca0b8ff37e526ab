"""The soft-label cache's format: the teacher's raw logits on disk, tied to the teacher and data that
made them (the package: format, build, reader, store, teacher).

A cache is a directory::

    manifest.json                 format, key, dtype, top_k, rows, classes, shards with sha256
    shard-00000.logits.npy        dense: raw logits of rows [start, stop)           (B, K)
    shard-00000.values.npy        top-k: the K' largest raw logits per row           (B, K')
    shard-00000.indices.npy       top-k: their class indices (uint16 if C <= 65,536, else int32)
    shard-00000.tail_lse.npy      top-k: log-sum-exp of the other logits at T = 1    (B,)
    shard-00000.feature0.npy      cache.features[0]: the teacher module's output      (B, *shape)

Teacher features (intermediate activations, optionally pooled) are captured in the same forward
pass as the logits and live in the same shards: same key, manifest, checksums, resume and verify.
The manifest records each one's module, pooling and per-row shape, `bytes_per_row`, `index_dtype`
and how the teacher ran (`capture`: bf16 autocast or not; the device is not part of the key).

The teacher's outputs are encoded on its own device (encode.py) and only the encoded arrays are
copied to the host, so the cache keeps up with a teacher on a GPU.

Raw logits (not probabilities) are stored so any temperature can be applied later. The **key**
hashes the teacher fingerprint, the data fingerprint and the cache settings: a changed teacher or
changed data can never be served stale soft labels.

Caches are built in a content-addressed store, ``<work>/cache/<key>/``, that outlives DVC (which
deletes a stage's outputs before re-running it). Each shard is written to a temporary name and
renamed when complete, with a sha256 sidecar; a re-run keeps every shard that verifies and computes
only the missing ones, so a crash costs at most one shard. A finished cache is published into the
stage output by hard links, and a later run with the same key publishes it again without running
the teacher.

Top-k tail at T ≠ 1: only the tail's log-sum-exp at T = 1 (``L``) and its size ``n`` are known. The
tail is treated as ``n`` equal logits ``L - log n`` — exact in total mass at T = 1, and at any T it
keeps the tail as one bucket whose mass follows from those equal logits: ``n · exp((L - log n)/T)``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kd_core.errors import UserError

FORMAT_VERSION = 3  # 3: uint16 indices for vocabularies up to 65,536 classes, capture record
MANIFEST = "manifest.json"
PACKED = "packed"  # the role of a compact shard's one file: its values, indices and tail, zstd-compressed
VIEWS_FILE = "views.npy"  # cache.views: every cache row's view parameters (rows, D) float32, beside the shards
STORE = "cache"  # under params.paths.work
_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}  # bf16 kept as its bits

Features = list[torch.Tensor]  # one (B, *shape) tensor per CacheSettings.features entry


@dataclass(frozen=True)
class CacheSettings:
    dtype: str
    shard_rows: int
    top_k: int | None = None  # None: dense
    features: tuple[tuple[str, str], ...] = ()  # (teacher module, pooling) per captured feature
    views: int = 0  # augmented views per input row (rows = input row × view); 0: the plain rows
    augment: str = ""  # the views' recipe as canonical JSON (cache.augment), "" without views
    top_p: float | None = None  # a row keeps the fewest logits reaching this probability, at most top_k
    sampling: int | None = None  # classes drawn from the rest with their weights (sparse.py), within top_k
    encoding: str = "raw"  # raw: one .npy per role | compact: one zstd frame per shard (compact.py)

    def to_json(self) -> dict:
        """Features, views, top_p, sampling and a compact encoding only when used: a cache without them
        keeps the key it always had."""
        extra: dict = {"features": [list(f) for f in self.features]} if self.features else {}
        if self.views:
            extra |= {"views": self.views, "augment": self.augment_params()}
        extra |= {k: v for k, v in (("top_p", self.top_p), ("sampling", self.sampling)) if v is not None}
        if self.encoding != "raw":
            extra["encoding"] = self.encoding
        return {"dtype": self.dtype, "shard_rows": self.shard_rows, "top_k": self.top_k, **extra}

    @property
    def sparse(self) -> bool:
        """Rows of different sizes (top_p, sampling): -inf in unused slots, each row its own tail size."""
        return bool(self.top_k) and (self.top_p is not None or bool(self.sampling))

    def augment_params(self) -> dict:
        return json.loads(self.augment) if self.augment else {}

    def roles(self) -> tuple[str, ...]:
        """The files of one shard (`packed` holds a compact shard's values, indices and tail)."""
        logit_roles = ("values", "indices", "tail_lse") if self.top_k else ("logits",)
        if self.encoding == "compact":
            logit_roles = (PACKED,)
        return logit_roles + tuple(feature_role(j) for j in range(len(self.features)))


def storage_dtype(dtype: str) -> np.dtype:
    """The numpy dtype a cache of `dtype` is stored as (bfloat16 as its 16-bit pattern)."""
    return np.dtype(_STORAGE[dtype])


def index_dtype(n_classes: int) -> np.dtype:
    """Top-k class indices: uint16 while every class fits (32k-49k LM vocabularies), else int32 (128k+)."""
    return np.dtype(np.uint16 if n_classes <= 1 << 16 else np.int32)


def feature_role(j: int) -> str:
    return f"feature{j}"


def bytes_per_row(settings: CacheSettings, n_classes: int, feature_shapes: tuple[tuple[int, ...], ...]) -> int:
    """Bytes one cached row costs on disk (npy headers aside): logits or top-k arrays plus every feature."""
    item = storage_dtype(settings.dtype).itemsize
    index = index_dtype(n_classes).itemsize
    logits = settings.top_k * (item + index) + 4 if settings.top_k else n_classes * item  # + indices, tail
    return logits + sum(int(np.prod(shape)) * item for shape in feature_shapes)


def cache_key(teacher_fingerprint: str, data_fingerprint: str, settings: CacheSettings) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, "teacher": teacher_fingerprint,
                       "data": data_fingerprint, "settings": settings.to_json()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def shard_ranges(n_rows: int, shard_rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_rows, n_rows)) for s in range(0, n_rows, shard_rows)]


def decode(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Storage array -> float32.  # (B, ...)"""
    if dtype == "bfloat16":
        return torch.from_numpy(np.array(stored)).view(torch.bfloat16).float().numpy()  # copy: writable
    if dtype == "float16":  # torch converts with F16C; numpy's float16 cast is ~10x slower
        return torch.from_numpy(np.array(stored)).float().numpy()
    return np.asarray(stored, dtype=np.float32)


def clamp_tail(row_min: np.ndarray, tail_lse: np.ndarray, n_tail: int | np.ndarray) -> np.ndarray:
    """The tail's log-sum-exp, lowered where needed so its equal per-class logit L - log n never
    exceeds the smallest kept logit `row_min` (as stored).  # (B,), (B,) -> (B,)

    In float32 that holds by construction (every tail logit ≤ every kept one); once the kept values
    are rounded to float16/bfloat16 the smallest may round below the tail, which would make the tail
    classes look likelier than a cached one. Clamping moves at most one rounding step of mass.
    """
    if np.isscalar(n_tail) and n_tail == 0:
        return tail_lse
    limit = row_min.astype(np.float64) + np.log(n_tail)  # (B,)
    limit32 = limit.astype(np.float32)
    limit32 = np.where(limit32 > limit, np.nextafter(limit32, np.float32(-np.inf)), limit32)  # round down
    return np.minimum(tail_lse.astype(np.float32), limit32)


def _expected(role: str, rows: int, manifest: dict) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a role's array (a packed shard: its decoded values, indices and tail)."""
    storage = storage_dtype(manifest["dtype"])
    features = {f["role"]: f["shape"] for f in manifest.get("features", [])}
    if role in features:
        return (rows, *features[role]), storage
    k = manifest.get("top_k")
    return {"logits": ((rows, manifest["classes"]), storage), "values": ((rows, k), storage),
            "indices": ((rows, k), np.dtype(manifest["index_dtype"])),
            "tail_lse": ((rows,), np.dtype(np.float32))}[role]


def is_sparse(manifest: dict) -> bool:
    """A cache whose rows keep different numbers of classes (top_p, sampling)."""
    return manifest.get("top_p") is not None or bool(manifest.get("sampling"))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shard_file(i: int, role: str) -> str:
    return f"shard-{i:05d}.{role}.npy"


def read_manifest(path: Path) -> dict:
    mpath = path / MANIFEST
    if not mpath.exists():
        raise UserError(f"{path} holds no logit cache ({MANIFEST} missing): run the cache_logits stage")
    try:
        manifest = json.loads(mpath.read_text())
    except ValueError as exc:
        raise UserError(f"{mpath} is not valid JSON: {exc}") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise UserError(f"{mpath}: cache format {manifest.get('format')!r}, this kd reads {FORMAT_VERSION}; "
                        "re-run the cache_logits stage")
    return manifest


def verify_manifest(path: Path, manifest: dict) -> list[str]:
    """Every problem: row coverage, missing files, checksums, shapes, dtypes and finite values."""
    problems, expected_start = [], 0
    for s in manifest["shards"]:
        if s["start"] != expected_start:
            problems.append(f"shard at rows {s['start']}:{s['stop']}: expected to start at {expected_start}")
        expected_start = s["stop"]
        for role, a in s["arrays"].items():
            f = path / a["file"]
            if not f.exists():
                problems.append(f"{f}: missing")
            elif sha256_file(f) != a["sha256"]:
                problems.append(f"{f}: checksum mismatch (corrupted or modified)")
            else:
                problems += _check_array(f, role, s["stop"] - s["start"], manifest)
    if expected_start != manifest["rows"]:
        problems.append(f"{path}: shards cover {expected_start} rows, manifest says {manifest['rows']}")
    return problems + _view_problems(path, manifest)


def _view_problems(path: Path, manifest: dict) -> list[str]:
    """The views file of a cache with `views`: present, its checksum, one row of parameters per cache row."""
    views = manifest.get("views")
    if not views:
        return []
    f = path / views["file"]
    if not f.exists():
        return [f"{f}: missing"]
    if sha256_file(f) != views["sha256"]:
        return [f"{f}: checksum mismatch (corrupted or modified)"]
    arr = np.load(f, mmap_mode="r", allow_pickle=False)
    if arr.dtype != np.float32 or arr.ndim != 2 or len(arr) != manifest["rows"]:
        return [f"{f}: shape {arr.shape} dtype {arr.dtype}, expected ({manifest['rows']}, D) float32"]
    return [] if np.isfinite(arr).all() else [f"{f}: non-finite view parameters"]


def read_views(path: Path, manifest: dict) -> np.ndarray | None:
    """The cache's view parameters (rows, D), checksum-verified; None for a cache without views."""
    views = manifest.get("views")
    if not views:
        return None
    if problems := _view_problems(path, manifest):
        raise UserError(f"logit cache {path}: {problems[0]}; run the cache_logits stage again")
    return np.load(path / views["file"], allow_pickle=False)


def _check_array(f: Path, role: str, rows: int, manifest: dict) -> list[str]:
    if role == PACKED:
        from kd_core.cache.compact import unpack

        try:
            arrays = unpack(np.load(f, allow_pickle=False), manifest)
        except ValueError as exc:
            return [f"{f}: {exc}"]
        return [p for r, a in arrays.items() for p in _check_values(f, r, a, rows, manifest)]
    return _check_values(f, role, np.load(f, mmap_mode="r", allow_pickle=False), rows, manifest)


def _check_values(f: Path, role: str, arr: np.ndarray, rows: int, manifest: dict) -> list[str]:
    shape, dtype = _expected(role, rows, manifest)
    if arr.shape != shape or arr.dtype != dtype:
        return [f"{f}: shape {arr.shape} dtype {arr.dtype}, expected {shape} {dtype}"]
    if role == "indices":
        bad = int(((arr < 0) | (arr >= manifest["classes"])).sum())
        return [f"{f}: {bad} class index(es) out of range"] if bad else []
    floats = role in ("logits", "values") or role.startswith("feature")
    values = decode(arr, manifest["dtype"]) if floats else np.asarray(arr)
    unused = role == "tail_lse" or (role == "values" and is_sparse(manifest))  # empty tail, unused slots: -inf
    finite = np.isfinite(values) | ((values == -np.inf) & unused)
    bad = int((~finite).sum())
    return [f"{f}: {bad} non-finite value(s)"] if bad else []


def verify_cache(path: Path) -> list[str]:
    """`kd cache verify`: every problem found in the cache at `path`. Empty means sound."""
    return verify_manifest(path, read_manifest(path))
