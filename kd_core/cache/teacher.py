"""The cache's side of the stages: the key a cache must carry, its settings from params, and the
picklable teacher pass that fills it. Both `cache_logits` and `train_student` use these, so no stage
imports another.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kd_core import data, distributed, features, tasks
from kd_core.cache.encode import Encoded, concat, encode_batch
from kd_core.cache.format import CacheSettings, Features, cache_key
from kd_core.config import Params
from kd_core.models import KDModel


def settings(params: Params) -> CacheSettings:
    return CacheSettings(params.cache.dtype, params.cache.shard_rows, params.cache.top_k,
                         tuple((f.module, f.pool) for f in params.cache.features))


def autocast(params: Params) -> str | None:
    """bf16 autocast of the teacher pass: on by default where the cache runs on CUDA (`cache.autocast`)."""
    return "bfloat16" if params.cache.autocast and distributed.pick_device(params.cache.device).type == "cuda" else None


def expected_keys(params: Params, workdir: Path) -> list[str]:
    """The key each teacher's cache must carry to be used with that teacher, the data and the settings."""
    task = tasks.for_params(params)
    data_fp = data.data_fingerprint(workdir / params.paths.prepared)
    return [cache_key(task.fingerprint(workdir / d), data_fp, settings(params)) for d in params.teacher_dirs()]


@functools.lru_cache(maxsize=2)
def _teacher_and_rows(task_name: str, teacher_dir: str, prepared_dir: str, device: str) -> tuple[KDModel, np.ndarray]:
    """Loaded once per process (in the stage, or in each Dask worker) and moved to `device`."""
    task = tasks.TASKS[task_name]
    model = task.load(Path(teacher_dir))[0].to(distributed.pick_device(device))
    return model, task.cache_inputs(data.read_prepared(Path(prepared_dir)))


@dataclass(frozen=True)
class TeacherLogits:
    """Picklable `compute(start, stop)`: paths travel to Dask workers, not tensors.

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

    @torch.inference_mode()
    def __call__(self, start: int, stop: int) -> Encoded | torch.Tensor | tuple[torch.Tensor, Features]:
        task = tasks.TASKS[self.task]
        teacher, x = _teacher_and_rows(self.task, self.teacher_dir, self.prepared_dir, self.device)
        device = next(teacher.parameters()).device
        per = task.positions(x)  # cache rows per input row
        # a row of many positions (lm) makes (rows · positions, vocabulary) logits: encoded batch by batch
        each = device.type != "cpu" or per > 1 if self.encode_each_batch is None else self.encode_each_batch
        first, last = start // per, -(-stop // per)  # input rows covering cache rows start:stop
        rows = x[first:last]
        order = torch.from_numpy(task.batch_order(teacher, rows))  # (n,) e.g. documents by length: less padding
        parts = []
        amp = torch.autocast("cuda", torch.bfloat16, enabled=self.autocast and device.type == "cuda")
        with features.captured(teacher, [m for m, _ in self.settings.features]) as acts, amp:
            for i in range(0, len(rows), self.batch_size):
                batch = task.cache_batch(teacher, rows[order[i:i + self.batch_size].numpy()])
                logits = task.cache_logits(teacher, _to(batch, device))  # (b·P, C)
                mask = features.padding_mask(teacher)
                feats = [features.pool(acts[m], p, mask) for m, p in self.settings.features]  # [(b, *S)]
                parts.append(encode_batch(logits, feats, self.settings, self.n_classes, consume=not feats)
                              if each else (logits, feats))
        keep = _cache_order(order, per, start - first * per, stop - first * per)  # (stop - start,)
        if each:
            return concat(parts).take(_to(keep, device))
        logits = torch.cat([lg for lg, _ in parts])[keep]  # (stop - start, C)
        if not self.settings.features:
            return logits
        return logits, [torch.cat(f)[keep] for f in zip(*(fs for _, fs in parts), strict=True)]


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
