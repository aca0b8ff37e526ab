"""The soft-label cache: the teacher's raw logits on disk, tied to the teacher and data that made them.

A cache is a directory::

    manifest.json                 format, key, dtype, top_k, rows, classes, shards with sha256
    shard-00000.logits.npy        dense: raw logits of rows [start, stop)           (B, K)
    shard-00000.values.npy        top-k: the K' largest raw logits per row           (B, K')
    shard-00000.indices.npy       top-k: their class indices (int32)                 (B, K')
    shard-00000.tail_lse.npy      top-k: log-sum-exp of the other logits at T = 1    (B,)
    shard-00000.feature0.npy      cache.features[0]: the teacher module's output      (B, *shape)

Teacher features (intermediate activations, optionally pooled) are captured in the same forward
pass as the logits and live in the same shards: same key, manifest, checksums, resume and verify.
The manifest records each one's module, pooling and per-row shape, and `bytes_per_row`.

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
import io
import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kd_core.errors import TransientError, UserError
from kd_core.fs import atomic_dir

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
STORE = "cache"  # under params.paths.work
_STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.int16}  # bf16 kept as its bits

Features = list[torch.Tensor]  # one (B, *shape) tensor per CacheSettings.features entry
Compute = Callable[[int, int], torch.Tensor | tuple[torch.Tensor, Features]]  # (start, stop) -> logits (B, K)


@dataclass(frozen=True)
class CacheSettings:
    dtype: str
    shard_rows: int
    top_k: int | None = None  # None: dense
    features: tuple[tuple[str, str], ...] = ()  # (teacher module, pooling) per captured feature

    def to_json(self) -> dict:
        """Features only when there are some: a logits-only cache keeps the key it always had."""
        extra = {"features": [list(f) for f in self.features]} if self.features else {}
        return {"dtype": self.dtype, "shard_rows": self.shard_rows, "top_k": self.top_k, **extra}

    def roles(self) -> tuple[str, ...]:
        logit_roles = ("values", "indices", "tail_lse") if self.top_k else ("logits",)
        return logit_roles + tuple(feature_role(j) for j in range(len(self.features)))


def feature_role(j: int) -> str:
    return f"feature{j}"


def bytes_per_row(settings: CacheSettings, n_classes: int, feature_shapes: tuple[tuple[int, ...], ...]) -> int:
    """Bytes one cached row costs on disk (npy headers aside): logits or top-k arrays plus every feature."""
    item = np.dtype(_STORAGE[settings.dtype]).itemsize
    logits = settings.top_k * (item + 4) + 4 if settings.top_k else n_classes * item  # + int32 indices, tail
    return logits + sum(int(np.prod(shape)) * item for shape in feature_shapes)


def cache_key(teacher_fingerprint: str, data_fingerprint: str, settings: CacheSettings) -> str:
    blob = json.dumps({"format": FORMAT_VERSION, "teacher": teacher_fingerprint,
                       "data": data_fingerprint, "settings": settings.to_json()}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def shard_ranges(n_rows: int, shard_rows: int) -> list[tuple[int, int]]:
    return [(s, min(s + shard_rows, n_rows)) for s in range(0, n_rows, shard_rows)]


# --- encoding -------------------------------------------------------------------------------------

def _store(x: torch.Tensor, dtype: str) -> np.ndarray:
    """Tensor -> storage array; bfloat16 has no numpy dtype, so its 16-bit pattern is stored as int16."""
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).cpu().numpy()
    return x.to(getattr(torch, dtype)).cpu().numpy()


def decode(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Storage array -> float32.  # (B, ...)"""
    if dtype == "bfloat16":
        return torch.from_numpy(np.array(stored)).view(torch.bfloat16).float().numpy()  # copy: writable
    if dtype == "float16":  # torch converts with F16C; numpy's float16 cast is ~10x slower
        return torch.from_numpy(np.array(stored)).float().numpy()
    return np.asarray(stored, dtype=np.float32)


def encode(logits: torch.Tensor, settings: CacheSettings) -> dict[str, np.ndarray]:
    """Raw logits (B, K) -> the arrays of one shard, by role."""
    logits = logits.float()
    if not settings.top_k:
        return {"logits": _store(logits, settings.dtype)}
    values, indices = logits.topk(settings.top_k, dim=-1)  # (B, K'), (B, K')
    tail = logits.scatter(-1, indices, float("-inf"))  # (B, K): top-k masked out
    tail_lse = torch.logsumexp(tail, dim=-1) if logits.shape[1] > settings.top_k \
        else torch.full((len(logits),), float("-inf"))  # (B,)
    return {"values": _store(values, settings.dtype), "indices": indices.to(torch.int32).numpy(),
            "tail_lse": tail_lse.numpy().astype(np.float32)}


def encode_features(feats: Features, settings: CacheSettings) -> dict[str, np.ndarray]:
    """Teacher features -> the arrays of one shard, stored in the cache's dtype like the logits."""
    return {feature_role(j): _store(f.float(), settings.dtype) for j, f in enumerate(feats)}


def _split(out: torch.Tensor | tuple[torch.Tensor, Features]) -> tuple[torch.Tensor, Features]:
    """A compute's result as (logits, features); a bare tensor is logits without features."""
    return (out, []) if isinstance(out, torch.Tensor) else out


def _expected(role: str, rows: int, manifest: dict) -> tuple[tuple[int, ...], np.dtype]:
    storage = np.dtype(_STORAGE[manifest["dtype"]])
    features = {f["role"]: f["shape"] for f in manifest.get("features", [])}
    if role in features:
        return (rows, *features[role]), storage
    k = manifest.get("top_k")
    return {"logits": ((rows, manifest["classes"]), storage), "values": ((rows, k), storage),
            "indices": ((rows, k), np.dtype(np.int32)), "tail_lse": ((rows,), np.dtype(np.float32))}[role]


# --- files ----------------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _npy_header(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(arr))
    return buf.getvalue()


def _write_array(path: Path, arr: np.ndarray) -> str:
    """Write a .npy via a temporary name + rename, then a sha256 sidecar; return the sha256.

    The digest is taken from the bytes in memory as they are written (no read-back), so hashing
    costs one pass over data already in cache. A crash leaves no file, a `.tmp` nobody trusts, or a
    file without a sidecar, which a re-run recomputes: resume never trusts an unverified shard. An
    `OSError` (disk full, file size limit) removes the partial file and becomes one clear line.
    """
    arr = np.ascontiguousarray(arr)
    header = _npy_header(arr)
    digest = hashlib.sha256(header)
    digest.update(memoryview(arr).cast("B"))
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            f.write(header)
            f.write(memoryview(arr).cast("B"))
        os.replace(tmp, path)
        side_tmp = path.with_name(path.name + ".sha256.tmp")
        side_tmp.write_text(digest.hexdigest())
        os.replace(side_tmp, path.with_name(path.name + ".sha256"))
        return digest.hexdigest()
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(f"cannot write cache shard {path}: {exc.strerror or exc}") from None


def _verified(path: Path) -> str | None:
    """The file's sha256 if it is complete and matches its sidecar, else None (recompute it)."""
    side = path.with_name(path.name + ".sha256")
    if not path.exists() or not side.exists():
        return None
    digest = sha256_file(path)
    return digest if digest == side.read_text().strip() else None


def shard_file(i: int, role: str) -> str:
    return f"shard-{i:05d}.{role}.npy"


def write_shard(store: Path, i: int, arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """Write one shard's arrays; returns {role: sha256}. Top-level so Dask workers can run it."""
    return {role: _write_array(store / shard_file(i, role), arr) for role, arr in arrays.items()}


def _verified_shard(store: Path, i: int, roles: tuple[str, ...]) -> dict[str, str] | None:
    digests = {r: _verified(store / shard_file(i, r)) for r in roles}
    return None if any(d is None for d in digests.values()) else digests


# --- building -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CacheReport:
    key: str
    rows: int
    classes: int
    shards: int
    computed: int  # shards computed by the teacher in this call
    reused: int  # shards kept from an interrupted or earlier call
    unchanged: bool = False  # a complete cache with this key existed: the teacher did not run
    seconds: float = 0.0
    bytes_per_row: int = 0


def _compute_and_write(compute: Compute, settings: CacheSettings, store: Path, i: int, start: int,
                       stop: int, n_classes: int, shapes: tuple[tuple[int, ...], ...] = ()) -> dict[str, str]:
    """Teacher forward for one shard, then encode and write it (used by the Dask runner)."""
    logits, feats = _split(compute(start, stop))
    _check_shape(logits, start, stop, n_classes)
    _check_features(feats, start, stop, shapes)
    return write_shard(store, i, encode(logits, settings) | encode_features(feats, settings))


def _check_shape(logits: torch.Tensor, start: int, stop: int, n_classes: int) -> None:
    """Refuse what must never be cached: a wrong shape or non-finite logits."""
    if tuple(logits.shape) != (stop - start, n_classes):
        raise UserError(f"teacher returned logits of shape {tuple(logits.shape)} for rows {start}:{stop}, "
                        f"expected {(stop - start, n_classes)}")
    if not torch.isfinite(logits).all():
        bad = int((~torch.isfinite(logits)).sum())
        raise UserError(f"teacher returned {bad} non-finite logit(s) for rows {start}:{stop}; nothing cached")


def _check_features(feats: Features, start: int, stop: int, shapes: tuple[tuple[int, ...], ...]) -> None:
    """Features obey the same rule as logits: the announced shapes, finite values."""
    got = tuple(tuple(f.shape) for f in feats)
    want = tuple((stop - start, *s) for s in shapes)
    if got != want:
        raise UserError(f"teacher features for rows {start}:{stop} have shapes {got}, expected {want}")
    for j, f in enumerate(feats):
        if not torch.isfinite(f).all():
            raise UserError(f"teacher feature {j} has non-finite value(s) for rows {start}:{stop}; nothing cached")


def _run_serial(compute: Compute, settings: CacheSettings, store: Path, todo: list[tuple[int, int, int]],
                n_classes: int, shapes: tuple[tuple[int, ...], ...] = ()) -> dict[int, dict[str, str]]:
    """The teacher computes shard i+1 while a writer thread encodes, writes and hashes shard i.

    numpy writes and hashlib release the GIL, so disk and hashing overlap the forward passes.
    """
    done: dict[int, dict[str, str]] = {}
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending: list[tuple[int, Future]] = []
        for i, start, stop in todo:
            logits, feats = _split(compute(start, stop))  # (B, K), [(B, *shape)]
            _check_shape(logits, start, stop, n_classes)
            _check_features(feats, start, stop, shapes)
            pending.append((i, writer.submit(lambda i=i, lg=logits, fs=feats: write_shard(
                store, i, encode(lg, settings) | encode_features(fs, settings)))))
            while len(pending) > 1:  # at most one shard in flight: memory stays bounded
                j, fut = pending.pop(0)
                done[j] = fut.result()
        for j, fut in pending:
            done[j] = fut.result()
    return done


def _run_dask(compute: Compute, settings: CacheSettings, store: Path, todo: list[tuple[int, int, int]],
              n_classes: int, shapes: tuple[tuple[int, ...], ...], address: str | None) -> dict[int, dict[str, str]]:
    """Map shards over a Dask cluster: `address` of an existing one, else a temporary local cluster.

    Workers write shards straight into the store (a shared filesystem for remote clusters).
    """
    from distributed import Client, LocalCluster

    cluster = None
    try:
        if address:
            client = Client(address, timeout="30s")
        else:
            cluster = LocalCluster(n_workers=min(len(todo), os.cpu_count() or 1), threads_per_worker=1,
                                   processes=True, dashboard_address=None)
            client = Client(cluster)
    except OSError as exc:
        raise TransientError(f"cannot reach the Dask cluster {address}: {exc}") from None
    try:
        futures = {i: client.submit(_compute_and_write, compute, settings, store, i, start, stop, n_classes,
                                    shapes, pure=False) for i, start, stop in todo}
        return {i: f.result() for i, f in futures.items()}
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


def build_cache(compute: Compute, n_rows: int, n_classes: int, out: Path, work: Path, key: str,
                settings: CacheSettings, meta: dict, runner: str = "serial",
                dask_address: str | None = None,
                progress: Callable[[int, int], None] | None = None,
                feature_shapes: tuple[tuple[int, ...], ...] = ()) -> CacheReport:
    """Compute (or resume) every shard in the store, then publish shards + manifest into `out`.

    `feature_shapes` are the per-row shapes of `settings.features`, known before any shard is computed
    (a probe of the teacher), so a resumed cache whose shards all exist still gets its manifest.

    `progress(rows done, rows)` is called after each shard's forward pass (serial runner; the Dask
    runner reports once at the end, its dashboard shows the rest).
    """
    t0 = time.perf_counter()
    if settings.top_k and settings.top_k > n_classes:
        raise UserError(f"cache.top_k={settings.top_k} exceeds the number of classes ({n_classes})")
    if len(feature_shapes) != len(settings.features):
        raise ValueError(f"{len(settings.features)} feature(s) to cache, {len(feature_shapes)} shape(s) given")
    store = work / STORE / key
    store.mkdir(parents=True, exist_ok=True)
    ranges = shard_ranges(n_rows, settings.shard_rows)
    row_bytes = bytes_per_row(settings, n_classes, feature_shapes)
    complete = _complete_manifest(store, key)
    if complete is not None:
        _publish(store, out, complete)
        return CacheReport(key, n_rows, n_classes, len(ranges), 0, len(ranges), True,
                           time.perf_counter() - t0, row_bytes)
    digests = {i: d for i in range(len(ranges)) if (d := _verified_shard(store, i, settings.roles()))}
    todo = [(i, s, e) for i, (s, e) in enumerate(ranges) if i not in digests]
    if todo:
        run = _run_dask if runner == "dask" else _run_serial
        extra = (feature_shapes, dask_address) if runner == "dask" else (feature_shapes,)
        if progress is not None and runner != "dask":
            compute = _counted(compute, progress, n_rows - sum(e - s for _, s, e in todo), n_rows)
        digests.update(run(compute, settings, store, todo, n_classes, *extra))
        if progress is not None:
            progress(n_rows, n_rows)
    manifest = {"format": FORMAT_VERSION, "key": key, **settings.to_json(),
                "storage_dtype": np.dtype(_STORAGE[settings.dtype]).name, "rows": n_rows, "classes": n_classes,
                **_feature_manifest(settings, feature_shapes), "bytes_per_row": row_bytes,
                "shards": [{"start": s, "stop": e, "arrays": {r: {"file": shard_file(i, r), "sha256": digests[i][r]}
                                                             for r in settings.roles()}}
                           for i, (s, e) in enumerate(ranges)], **meta}  # no timestamps: byte-identical reruns
    missing = [a["file"] for sh in manifest["shards"] for a in sh["arrays"].values()
               if not (store / a["file"]).exists()]
    if missing:  # every shard was hashed as written; the manifest comes last, once all are in place
        raise UserError(f"cache {store}: shard files vanished while caching: {missing[:3]}")
    (store / MANIFEST).write_text(json.dumps(manifest, indent=2))
    _publish(store, out, manifest)
    return CacheReport(key, n_rows, n_classes, len(ranges), len(todo), len(ranges) - len(todo), False,
                       time.perf_counter() - t0, row_bytes)


def _feature_manifest(settings: CacheSettings, shapes: tuple[tuple[int, ...], ...]) -> dict:
    """The manifest's `features` entry: module, pooling, per-row shape and file role of each feature."""
    if not settings.features:
        return {}
    return {"features": [{"module": m, "pool": p, "shape": list(shape), "role": feature_role(j)}
                         for j, ((m, p), shape) in enumerate(zip(settings.features, shapes, strict=True))]}


def _counted(compute: Compute, progress: Callable[[int, int], None], done: int, total: int) -> Compute:
    """`compute` that reports the rows it has produced (starting from `done` resumed rows)."""
    rows = [done]
    progress(done, total)

    def counted(start: int, stop: int) -> torch.Tensor | tuple[torch.Tensor, Features]:
        logits = compute(start, stop)
        rows[0] += stop - start
        progress(rows[0], total)
        return logits

    return counted


def _complete_manifest(store: Path, key: str) -> dict | None:
    """The store's manifest if the cache with this key is complete and every file verifies."""
    try:
        manifest = read_manifest(store)
    except UserError:
        return None
    return manifest if manifest.get("key") == key and not verify_manifest(store, manifest) else None


def _publish(store: Path, out: Path, manifest: dict) -> None:
    """Hard-link the cache into the stage output (no copy), replacing it atomically."""
    with atomic_dir(out) as tmp:
        for s in manifest["shards"]:
            for a in s["arrays"].values():
                _link_or_copy(store / a["file"], tmp / a["file"])
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)


# --- reading and verifying ------------------------------------------------------------------------

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
    return problems


def _check_array(f: Path, role: str, rows: int, manifest: dict) -> list[str]:
    arr = np.load(f, mmap_mode="r", allow_pickle=False)
    shape, dtype = _expected(role, rows, manifest)
    if arr.shape != shape or arr.dtype != dtype:
        return [f"{f}: shape {arr.shape} dtype {arr.dtype}, expected {shape} {dtype}"]
    if role == "indices":
        bad = int(((arr < 0) | (arr >= manifest["classes"])).sum())
        return [f"{f}: {bad} class index(es) out of range"] if bad else []
    floats = role in ("logits", "values") or role.startswith("feature")
    values = decode(arr, manifest["dtype"]) if floats else np.asarray(arr)
    finite = np.isfinite(values) | ((values == -np.inf) & (role == "tail_lse"))  # empty tail: -inf
    bad = int((~finite).sum())
    return [f"{f}: {bad} non-finite value(s)"] if bad else []


def verify_cache(path: Path) -> list[str]:
    """`kd cache verify`: every problem found in the cache at `path`. Empty means sound."""
    return verify_manifest(path, read_manifest(path))


@dataclass(frozen=True)
class TopK:
    values: np.ndarray  # (B, K') float32 raw logits
    indices: np.ndarray  # (B, K') int64 class indices
    tail_lse: np.ndarray  # (B,) float32 log-sum-exp of the other logits at T = 1
    n_tail: int  # classes outside the top K'


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

    def _array(self, i: int, role: str) -> np.ndarray:
        if (i, role) not in self._arrays:
            a = self.manifest["shards"][i]["arrays"][role]
            f = self.path / a["file"]
            if not f.exists() or sha256_file(f) != a["sha256"]:
                raise UserError(f"{f}: checksum mismatch or missing; the cache is corrupt: "
                                "run `kd cache verify` and re-run the cache_logits stage")
            self._arrays[(i, role)] = np.load(f, mmap_mode="r", allow_pickle=False)
        return self._arrays[(i, role)]

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
        """Top-k view of rows `idx` (a dense cache is cut to its own top-k on the fly)."""
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
        return TopK(values, indices, tail, self.classes - k)

    def take(self, idx: np.ndarray) -> np.ndarray:
        """Rows `idx` (global row numbers) as float32 logits.  # (B,) -> (B, K)

        For a top-k cache the tail classes get the equal-logit approximation of the module docstring.
        """
        if not self.top_k:
            if self.rows * self.classes * 4 <= IN_MEMORY_MAX_BYTES:
                return self._in_memory()[idx]
            out = np.empty((len(idx), self.classes), dtype=np.float32)
            for sel, rows in self._gather(idx, "logits"):
                out[sel] = decode(rows, self.manifest["dtype"])
            return out
        t = self.take_topk(idx)
        fill = t.tail_lse - np.log(max(t.n_tail, 1))  # (B,)
        out = np.repeat(fill[:, None], self.classes, axis=1).astype(np.float32)
        np.put_along_axis(out, t.indices, t.values, axis=1)
        return out


# --- the store: listing and garbage collection ----------------------------------------------------

@dataclass(frozen=True)
class StoredCache:
    key: str
    path: Path
    complete: bool
    rows: int | None
    bytes: int
    modified: float  # the store directory's mtime
    teacher_fingerprint: str | None


def list_store(work: Path) -> list[StoredCache]:
    """Every cache in the store, complete or interrupted, newest first."""
    out = []
    for d in sorted((work / STORE).glob("*")):
        if not d.is_dir():
            continue
        size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
        try:
            m = read_manifest(d)
        except UserError:
            m = None
        out.append(StoredCache(d.name, d, m is not None, m and m["rows"], size, d.stat().st_mtime,
                               m and m.get("teacher_fingerprint")))
    return sorted(out, key=lambda c: (c.modified, c.key), reverse=True)


def gc_store(work: Path, keep: set[str]) -> list[StoredCache]:
    """Delete every stored cache whose key is not in `keep`; returns what was removed."""
    removed = [c for c in list_store(work) if c.key not in keep]
    for c in removed:
        shutil.rmtree(c.path)
    return removed
