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

from kd_core import data, features, tasks
from kd_core.cache.format import CacheSettings, Features, cache_key
from kd_core.config import Params
from kd_core.models import KDModel


def settings(params: Params) -> CacheSettings:
    return CacheSettings(params.cache.dtype, params.cache.shard_rows, params.cache.top_k,
                         tuple((f.module, f.pool) for f in params.cache.features))


def expected_keys(params: Params, workdir: Path) -> list[str]:
    """The key each teacher's cache must carry to be used with that teacher, the data and the settings."""
    task = tasks.for_params(params)
    data_fp = data.data_fingerprint(workdir / params.paths.prepared)
    return [cache_key(task.fingerprint(workdir / d), data_fp, settings(params)) for d in params.teacher_dirs()]


@functools.lru_cache(maxsize=2)
def _teacher_and_rows(task_name: str, teacher_dir: str, prepared_dir: str) -> tuple[KDModel, np.ndarray]:
    """Loaded once per process: in the stage, or in each Dask worker."""
    task = tasks.TASKS[task_name]
    return task.load(Path(teacher_dir))[0], task.cache_inputs(data.read_prepared(Path(prepared_dir)))


@dataclass(frozen=True)
class TeacherLogits:
    """Picklable `compute(start, stop)`: paths travel to Dask workers, not tensors."""

    task: str
    teacher_dir: str
    prepared_dir: str
    batch_size: int
    features: tuple[tuple[str, str], ...] = ()  # (module, pool): captured in the same forward passes

    @torch.inference_mode()
    def __call__(self, start: int, stop: int) -> torch.Tensor | tuple[torch.Tensor, Features]:
        task = tasks.TASKS[self.task]
        teacher, x = _teacher_and_rows(self.task, self.teacher_dir, self.prepared_dir)
        rows = x[start:stop]
        order = torch.from_numpy(task.batch_order(teacher, rows))  # (n,) e.g. documents by length: less padding
        outs, feats = [], []
        with features.captured(teacher, [m for m, _ in self.features]) as acts:
            for i in range(0, len(rows), self.batch_size):
                batch = torch.from_numpy(rows[order[i:i + self.batch_size].numpy()])
                outs.append(task.cache_logits(teacher, batch))  # (b, C)
                mask = features.padding_mask(teacher)
                feats.append([features.pool(acts[m], p, mask) for m, p in self.features])  # [(b, *S)]
        back = torch.argsort(order)  # cache order again
        if not self.features:
            return torch.cat(outs)[back]  # (stop - start, C)
        return torch.cat(outs)[back], [torch.cat(f)[back] for f in zip(*feats, strict=True)]
