"""Building a cache: shards computed by the teacher (serially or on a Dask cluster, one worker per
GPU), encoded on the teacher's device (encode.py), each written atomically with a sha256 sidecar into
the content-addressed store, resumed after a crash, then published into the stage output by hard
links. A build holds its key's store lock (store.py), so `kd cache gc` never deletes a cache while
it is being built.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kd_core.cache.cluster import run_dask
from kd_core.cache.encode import Compute, Encoded, encode_batch, release_pinned, to_host
from kd_core.cache.format import (
    FORMAT_VERSION,
    MANIFEST,
    STORE,
    VIEWS_FILE,
    CacheSettings,
    Features,
    bytes_per_row,
    feature_role,
    index_dtype,
    read_manifest,
    sha256_file,
    shard_file,
    shard_ranges,
    storage_dtype,
    verify_manifest,
)
from kd_core.cache.store import key_lock
from kd_core.errors import UserError
from kd_core.fs import atomic_dir, atomic_write_text


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
    digest.update(arr.data.cast("B"))
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")  # unique per writer
    try:
        with tmp.open("wb") as f:
            f.write(header)
            f.write(arr.data.cast("B"))
        os.replace(tmp, path)
        atomic_write_text(path.with_name(path.name + ".sha256"), digest.hexdigest())
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


def write_shard(store: Path, i: int, arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """Write one shard's arrays; returns {role: sha256}. Top-level so Dask workers can run it."""
    return {role: _write_array(store / shard_file(i, role), arr) for role, arr in arrays.items()}


def _verified_shard(store: Path, i: int, roles: tuple[str, ...]) -> dict[str, str] | None:
    digests = {r: _verified(store / shard_file(i, r)) for r in roles}
    return None if any(d is None for d in digests.values()) else {r: d for r, d in digests.items() if d is not None}


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
    """Teacher forward for one shard, then encode and write it (what a Dask worker runs)."""
    return write_shard(store, i, _shard_arrays(compute(start, stop), settings, n_classes, start, stop, shapes)())


def _shard_arrays(out: torch.Tensor | tuple[torch.Tensor, Features] | Encoded, settings: CacheSettings,
                  n_classes: int, start: int, stop: int,
                  shapes: tuple[tuple[int, ...], ...]) -> Callable[[], dict[str, np.ndarray]]:
    """What the writer thread calls for one shard's arrays. Logits on an accelerator are encoded now,
    queued behind their forward pass, and start their copy to the host; logits on the CPU are
    encoded later by the writer itself, beside the next shard's forward."""
    if _device(out).type == "cpu":
        return lambda: to_host(_encoded(out, settings, n_classes, start, stop, shapes)).arrays(
            settings, n_classes, (start, stop))
    host = to_host(_encoded(out, settings, n_classes, start, stop, shapes))
    return lambda: host.arrays(settings, n_classes, (start, stop))


def _device(out: torch.Tensor | tuple[torch.Tensor, Features] | Encoded) -> torch.device:
    if isinstance(out, Encoded):
        return out.nonfinite.device
    return (out if isinstance(out, torch.Tensor) else out[0]).device


def _encoded(out: torch.Tensor | tuple[torch.Tensor, Features] | Encoded, settings: CacheSettings, n_classes: int,
             start: int, stop: int, shapes: tuple[tuple[int, ...], ...]) -> Encoded:
    """A compute's result encoded on its device (a bare tensor is logits without features), its
    shapes checked against rows start:stop and the announced feature shapes; values are checked on
    the host once copied (Host.arrays), so nothing here waits for the device."""
    if not isinstance(out, Encoded):
        logits, feats = (out, []) if isinstance(out, torch.Tensor) else out
        if tuple(logits.shape) != (stop - start, n_classes):
            raise UserError(f"teacher returned logits of shape {tuple(logits.shape)} for rows {start}:{stop}, "
                            f"expected {(stop - start, n_classes)}")
        out = encode_batch(logits, feats, settings, n_classes)
    if out.rows != stop - start:
        raise UserError(f"teacher returned {out.rows} rows for rows {start}:{stop}")
    got = tuple(tuple(out.arrays[feature_role(j)].shape) for j in range(len(settings.features)))
    want = tuple((stop - start, *s) for s in shapes)
    if got != want:
        raise UserError(f"teacher features for rows {start}:{stop} have shapes {got}, expected {want}")
    return out


def _run_serial(compute: Compute, settings: CacheSettings, store: Path, todo: list[tuple[int, int, int]],
                n_classes: int, shapes: tuple[tuple[int, ...], ...] = ()) -> dict[int, dict[str, str]]:
    """The teacher computes shard i+1 while a writer thread finishes shard i: waits for its copy to
    the host (or encodes CPU logits), checks, writes and hashes it.

    On a GPU the forward passes are only queued here; numpy writes and hashlib release the GIL, so
    copies, disk and hashing all overlap the teacher.
    """
    done: dict[int, dict[str, str]] = {}
    with ThreadPoolExecutor(max_workers=1) as writer:
        pending: list[tuple[int, Future]] = []
        for i, start, stop in todo:
            arrays = _shard_arrays(compute(start, stop), settings, n_classes, start, stop, shapes)
            pending.append((i, writer.submit(lambda i, a: write_shard(store, i, a()), i, arrays)))
            while len(pending) > 1:  # at most one shard in flight: memory stays bounded
                j, fut = pending.pop(0)
                done[j] = fut.result()
        for j, fut in pending:
            done[j] = fut.result()
    return done


def build_cache(compute: Compute, n_rows: int, n_classes: int, out: Path, work: Path, key: str,
                settings: CacheSettings, meta: dict, runner: str = "serial",
                dask_address: str | None = None,
                progress: Callable[[int, int], None] | None = None,
                feature_shapes: tuple[tuple[int, ...], ...] = (), autocast: str | None = None,
                device: str = "cpu", gpus: int = 0, views: np.ndarray | None = None) -> CacheReport:
    """Compute (or resume) every shard in the store, then publish shards + manifest into `out`.

    `feature_shapes` are the per-row shapes of `settings.features`, known before any shard is computed
    (a probe of the teacher), so a resumed cache whose shards all exist still gets its manifest.

    `progress(rows done, rows)` is called after each shard's forward pass (serial runner; the Dask
    runner reports once at the end, its dashboard shows the rest).

    `autocast` ("bfloat16" or None) and `device` ("cpu", "cuda", ...) say how the teacher computes:
    recorded in the manifest, not the key; shards an interrupted build left under another capture
    are computed again, never mixed (ties in the top-k may break differently per device).
    `gpus`: devices a temporary Dask cluster gives one worker each.
    `views` (cache.views): every row's view parameters, written into the store (VIEWS_FILE, with its
    sha256 in the manifest) before any shard is computed, as `compute` renders its views from that file.
    """
    t0 = time.perf_counter()
    if settings.top_k and settings.top_k > n_classes:
        raise UserError(f"cache.top_k={settings.top_k} exceeds the number of classes ({n_classes})")
    if len(feature_shapes) != len(settings.features):
        raise ValueError(f"{len(settings.features)} feature(s) to cache, {len(feature_shapes)} shape(s) given")
    with key_lock(work, key):  # `kd cache gc` skips a cache while its build holds this
        capture = {"device": device, "autocast": autocast}
        if views is not None:
            meta = meta | {"views": _write_views(work / STORE / key, views, n_rows, settings)}
        return _build_locked(compute, n_rows, n_classes, out, work, key, settings, meta | {"capture": capture},
                             runner, (dask_address, gpus), progress, feature_shapes, t0)


def views_path(work: Path, key: str) -> Path:
    """Where the build of `key` keeps its view parameters (what TeacherLogits renders its views from)."""
    return work / STORE / key / VIEWS_FILE


def _write_views(store: Path, views: np.ndarray, n_rows: int, settings: CacheSettings) -> dict:
    """The views file in the store (kept when it verifies: the same key draws the same views); its
    manifest entry."""
    if len(views) != n_rows or views.dtype != np.float32:
        raise ValueError(f"{len(views)} view rows of {views.dtype} for a cache of {n_rows} rows")
    store.mkdir(parents=True, exist_ok=True)
    digest = _verified(store / VIEWS_FILE) or _write_array(store / VIEWS_FILE, views)
    return {"file": VIEWS_FILE, "sha256": digest, "per_row": settings.views, "augment": settings.augment_params()}


def _build_locked(compute: Compute, n_rows: int, n_classes: int, out: Path, work: Path, key: str,
                  settings: CacheSettings, meta: dict, runner: str, dask: tuple[str | None, int],
                  progress: Callable[[int, int], None] | None, feature_shapes: tuple[tuple[int, ...], ...],
                  t0: float) -> CacheReport:
    store = work / STORE / key
    store.mkdir(parents=True, exist_ok=True)
    ranges = shard_ranges(n_rows, settings.shard_rows)
    row_bytes = bytes_per_row(settings, n_classes, feature_shapes)
    complete = _complete_manifest(store, key)
    if complete is not None:
        _publish(store, out, complete)
        return CacheReport(key, n_rows, n_classes, len(ranges), 0, len(ranges), True,
                           time.perf_counter() - t0, int(complete.get("bytes_per_row", row_bytes)))
    reusable = _same_capture(store, meta["capture"])
    digests = {i: d for i in range(len(ranges)) if reusable and (d := _verified_shard(store, i, settings.roles()))}
    todo = [(i, s, e) for i, (s, e) in enumerate(ranges) if i not in digests]
    if todo:
        if progress is not None and runner != "dask":
            compute = _counted(compute, progress, n_rows - sum(e - s for _, s, e in todo), n_rows)
        try:
            if runner == "dask":
                task = functools.partial(_compute_and_write, compute, settings, store, n_classes=n_classes,
                                         shapes=feature_shapes)
                digests.update(run_dask(task, store, todo, *dask))
            else:
                digests.update(_run_serial(compute, settings, store, todo, n_classes, feature_shapes))
        finally:
            release_pinned()
        if progress is not None:
            progress(n_rows, n_rows)
    if settings.encoding == "compact":  # compressed: what the shards really take (headers included)
        files = [store / shard_file(i, r) for i in range(len(ranges)) for r in settings.roles()]
        row_bytes = round(sum(f.stat().st_size for f in files) / max(n_rows, 1))
    manifest = {"format": FORMAT_VERSION, "key": key, **settings.to_json(),
                "storage_dtype": storage_dtype(settings.dtype).name, "index_dtype": index_dtype(n_classes).name,
                "rows": n_rows, "classes": n_classes,
                **_feature_manifest(settings, feature_shapes), "bytes_per_row": row_bytes,
                "shards": [{"start": s, "stop": e, "arrays": {r: {"file": shard_file(i, r), "sha256": digests[i][r]}
                                                             for r in settings.roles()}}
                           for i, (s, e) in enumerate(ranges)], **meta}  # no timestamps: byte-identical reruns
    missing = [a["file"] for sh in manifest["shards"] for a in sh["arrays"].values()
               if not (store / a["file"]).exists()]
    if missing:  # every shard was hashed as written; the manifest comes last, once all are in place
        raise UserError(f"cache {store}: shard files vanished while caching: {missing[:3]}")
    atomic_write_text(store / MANIFEST, json.dumps(manifest, indent=2))
    _publish(store, out, manifest)
    return CacheReport(key, n_rows, n_classes, len(ranges), len(todo), len(ranges) - len(todo), False,
                       time.perf_counter() - t0, row_bytes)


def _same_capture(store: Path, capture: dict) -> bool:
    """Whether shards already in `store` were computed the way this build computes (then they resume);
    records this build's way for the next one."""
    record = store / "capture.json"
    same = not record.exists() or json.loads(record.read_text()) == capture
    if not same:  # no later build may take those shards for this capture's either
        for side in store.glob("*.sha256"):
            side.unlink()
    if not same or not record.exists():
        atomic_write_text(record, json.dumps(capture))
    return same


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

    def counted(start: int, stop: int) -> torch.Tensor | tuple[torch.Tensor, Features] | Encoded:
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
        if manifest.get("views"):
            _link_or_copy(store / manifest["views"]["file"], tmp / manifest["views"]["file"])
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem
        shutil.copy2(src, dst)


