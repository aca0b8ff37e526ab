"""The cache's side of the stages: the key a cache must carry, its settings from params, and the
picklable teacher pass that fills it. Both `cache_logits` and `train_student` use these, so no stage
imports another.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kd_core import data, distributed, features, tasks
from kd_core.cache.encode import Encoded, concat, encode_batch
from kd_core.cache.format import CacheSettings, Features, cache_key, sha256_file
from kd_core.config import Params
from kd_core.errors import UserError


def settings(params: Params) -> CacheSettings:
    c = params.cache
    augment = json.dumps(c.augment.model_dump(mode="json"), sort_keys=True) if c.views else ""
    return CacheSettings(c.dtype, c.shard_rows, c.top_k, tuple((f.module, f.pool) for f in c.features),
                         c.views, augment, c.top_p, c.sampling, c.encoding)


def autocast(params: Params) -> str | None:
    """bf16 autocast of the teacher pass: on by default where the cache runs on CUDA (`cache.autocast`)."""
    return "bfloat16" if params.cache.autocast and distributed.pick_device(params.cache.device).type == "cuda" else None


def expected_keys(params: Params, workdir: Path) -> list[str]:
    """The key each teacher's cache must carry to be used with that teacher, the data and the settings."""
    task = tasks.for_params(params)
    data_fp = data.data_fingerprint(workdir / params.paths.prepared)
    return [cache_key(task.fingerprint(workdir / d), data_fp, settings(params)) for d in params.teacher_dirs()]


@functools.cache
def code_identity() -> str:
    """This process's kd_core: its installed version and a hash of every kd_core source file (a superset
    of what the cache code runs, so any change asks a long-lived cluster to restart rather than risk it).

    Taken once per process, at its first cache task (just after the task's unpickling imported the
    modules), so a long-lived Dask worker keeps the identity of the code it actually loaded.
    """
    try:
        version = importlib.metadata.version("kd-pipeline")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    package = Path(__file__).resolve().parents[1]  # kd_core/
    h = hashlib.sha256()
    for file in sorted(package.rglob("*.py")):
        h.update(file.relative_to(package).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
    return f"kd-pipeline {version} (source {h.hexdigest()[:12]})"


_KEEP = 2  # (teacher, rows) pairs a process holds: an ensemble's members alternate without reloading
_loaded: OrderedDict[tuple[str, str, str, str, str], tuple[tuple[str, str], nn.Module, np.ndarray]] = OrderedDict()
_loaded_lock = threading.Lock()


def _teacher_and_rows(task_name: str, teacher_dir: str, prepared_dir: str, device: str,
                      fingerprints: tuple[str, str], views_file: str = "") -> tuple[nn.Module, np.ndarray]:
    """The teacher (on `device`) and input rows, loaded once per process (the stage, or each Dask worker)
    for each (teacher, data) fingerprint pair: a task whose fingerprints differ from what this process
    holds for the same paths (a teacher retrained in place) reloads, so it never runs a stale teacher."""
    where = (task_name, teacher_dir, prepared_dir, device, views_file)
    with _loaded_lock:
        held = _loaded.get(where)
        if held is not None and held[0] == fingerprints:
            _loaded.move_to_end(where)
            return held[1], held[2]
        _loaded.pop(where, None)  # free the stale teacher before its successor takes the memory
        model, rows = _load(task_name, Path(teacher_dir), Path(prepared_dir), device, fingerprints, views_file)
        _loaded[where] = (fingerprints, model, rows)
        while len(_loaded) > _KEEP:
            _loaded.popitem(last=False)
        return model, rows


def _load(task_name: str, teacher_dir: Path, prepared_dir: Path, device: str,
          fingerprints: tuple[str, str], views_file: str) -> tuple[nn.Module, np.ndarray]:
    """Load, then check the files loaded are the ones the submitting stage keyed the cache by."""
    for what, path in (("teacher", teacher_dir), ("prepared data", prepared_dir)):
        if not path.exists():
            raise UserError(f"{_this_process()} does not see the {what} at {path}: a Dask cluster needs it on a "
                            "filesystem every worker mounts at the same path")
    task = tasks.get(task_name)
    model = task.load(teacher_dir)[0].to(distributed.pick_device(device))
    rows = task.cache_inputs(data.read_prepared(prepared_dir), _views(Path(views_file)) if views_file else None)
    seen = (task.fingerprint(teacher_dir), data.data_fingerprint(prepared_dir))
    for what, path, got, want in zip(("teacher", "prepared data"), (teacher_dir, prepared_dir), seen, fingerprints,
                                     strict=True):
        if got != want:
            raise UserError(f"{_this_process()}: the {what} at {path} has fingerprint {got[:12]}, expected {want[:12]} "
                            "by the cache_logits stage (it changed while caching, or this worker sees other "
                            "files): re-run cache_logits")
    return model, rows


def _this_process() -> str:
    """Who refuses a cache task, as its one-line error names it: the Dask worker's address (the one to
    restart or fix), else the host of the stage's own process."""
    try:
        from distributed import get_worker

        return f"Dask worker {get_worker().address}"
    except (ImportError, ValueError):  # ValueError: not inside a Dask worker
        return f"cache task on {socket.gethostname()}"


def _views(path: Path) -> np.ndarray:
    """The view parameters the build wrote (cache.build_cache), checked against their sha256 sidecar."""
    side = path.with_name(path.name + ".sha256")
    if not side.is_file() or sha256_file(path) != side.read_text().strip():
        raise UserError(f"{_this_process()}: {path} is missing or does not match its checksum "
                        "(this worker sees other files than the cache_logits stage): re-run cache_logits")
    return np.load(path, allow_pickle=False)


@dataclass(frozen=True)
class TeacherLogits:
    """Picklable `compute(start, stop)`: paths travel to Dask workers, not tensors, with the teacher and
    data fingerprints and the kd_core identity of the submitter, which every task checks its worker against.

    The teacher runs on `device` (resolved where the call runs: `auto` is each worker's own GPU),
    under bf16 autocast on CUDA when `autocast`. On an accelerator every batch is encoded where it
    was computed (encode.py), so a shard crosses to the host as top-k arrays, never as (B, C)
    logits; on the CPU the raw logits go to the build's writer thread, which encodes them beside the
    next shard's forward — unless a row holds many positions (`lm`: a shard's raw logits would be
    rows × vocabulary floats), then batches are encoded as they come. `encode_each_batch` forces
    either way (e.g. to test the device path on the CPU).
    """

    task: str
    teacher_dir: str
    prepared_dir: str
    batch_size: int
    settings: CacheSettings
    n_classes: int
    device: str = "cpu"
    autocast: bool = False
    encode_each_batch: bool | None = None  # None: on accelerators, and for rows of several positions
    views_file: str = ""  # cache.views: the view parameters the rows are rendered from (build.views_path)
    # what the cache key was made from, fixed where the task is submitted ("": taken from the files then)
    teacher_fingerprint: str = ""
    data_fingerprint: str = ""
    code: str = field(default_factory=code_identity)  # the submitter's kd_core; a worker must run the same

    def __post_init__(self) -> None:
        for name in ("teacher_dir", "prepared_dir", "views_file"):  # a worker resolves nothing in its own cwd
            if getattr(self, name):
                object.__setattr__(self, name, str(Path(getattr(self, name)).resolve()))
        if not self.teacher_fingerprint:
            object.__setattr__(self, "teacher_fingerprint", tasks.get(self.task).fingerprint(Path(self.teacher_dir)))
        if not self.data_fingerprint:
            object.__setattr__(self, "data_fingerprint", data.data_fingerprint(Path(self.prepared_dir)))

    @torch.inference_mode()
    def __call__(self, start: int, stop: int) -> Encoded | torch.Tensor | tuple[torch.Tensor, Features]:
        if self.code != code_identity():
            raise UserError(f"{_this_process()} runs {code_identity()}, the submitting process {self.code}: "
                            "restart the Dask cluster with the same kd_core")
        task = tasks.get(self.task)
        teacher, x = _teacher_and_rows(self.task, self.teacher_dir, self.prepared_dir, self.device,
                                       (self.teacher_fingerprint, self.data_fingerprint), self.views_file)
        device = next(teacher.parameters()).device
        per = task.positions(x)  # cache rows per input row
        # a row of many positions (lm) makes (rows · positions, vocabulary) logits: encoded batch by batch
        each = device.type != "cpu" or per > 1 if self.encode_each_batch is None else self.encode_each_batch
        first, last = start // per, -(-stop // per)  # input rows covering cache rows start:stop
        rows = x[first:last]
        order = torch.from_numpy(task.batch_order(teacher, rows))  # (n,) e.g. documents by length: less padding
        parts: list[Encoded] = []  # each batch encoded on the device
        raw: list[tuple[torch.Tensor, Features]] = []  # or its logits and features as they are
        amp = torch.autocast("cuda", torch.bfloat16, enabled=self.autocast and device.type == "cuda")
        with features.captured(teacher, [m for m, _ in self.settings.features]) as acts, amp:
            for i in range(0, len(rows), self.batch_size):
                batch = task.cache_batch(teacher, rows[order[i:i + self.batch_size].numpy()])
                logits = task.cache_logits(teacher, _to(batch, device))  # (b·P, C)
                mask = features.padding_mask(teacher)
                feats = [features.pool(acts[m], p, mask) for m, p in self.settings.features]  # [(b, *S)]
                if each:
                    parts.append(encode_batch(logits, feats, self.settings, self.n_classes, consume=not feats))
                else:
                    raw.append((logits, feats))
        keep = _cache_order(order, per, start - first * per, stop - first * per)  # (stop - start,)
        if each:
            return concat(parts).take(_to(keep, device))
        logits = torch.cat([lg for lg, _ in raw])[keep]  # (stop - start, C)
        if not self.settings.features:
            return logits
        return logits, [torch.cat(f)[keep] for f in zip(*(fs for _, fs in raw), strict=True)]


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to CUDA from pinned memory without waiting (a pageable copy would
    wait for every kernel queued before it)."""
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _cache_order(order: torch.Tensor, per: int, lo: int, hi: int) -> torch.Tensor:
    """Positions, in the computed (length-sorted) output, of cache rows lo:hi of these input rows.  # (hi - lo,)

    Input row order[j] was computed j-th, so its P cache rows sit at j·P … j·P + P - 1 of the output.
    """
    back = torch.argsort(order)  # (n,) where each input row was computed
    return (back[:, None] * per + torch.arange(per)).reshape(-1)[lo:hi]
