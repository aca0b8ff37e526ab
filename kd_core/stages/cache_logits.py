"""cache_logits: run the teacher once over train + transfer rows and cache its raw logits.

With `cache.features`, the listed teacher activations are captured in the same pass and cached with them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kd_core import data, features, logits, models, progress
from kd_core.config import Params


@dataclass(frozen=True)
class CacheResult:
    reports: tuple[logits.CacheReport, ...]  # one per teacher

    def summary(self) -> str:
        return "; ".join(_describe(r) for r in self.reports)


def _describe(r: logits.CacheReport) -> str:
    if r.unchanged:
        return (f"logit cache {r.key[:12]} already complete ({r.rows} rows × {r.classes} classes, "
                f"{r.bytes_per_row} bytes/row): published it, the teacher did not run")
    return (f"cached {r.rows} rows × {r.classes} classes as {r.shards} shard(s) in {r.seconds:.1f} s, "
            f"key {r.key[:12]} ({r.computed} computed, {r.reused} resumed), {r.bytes_per_row} bytes/row")


def cache_rows(splits: data.Splits) -> np.ndarray:
    """The rows the student learns from, in cache order: labelled train rows, then transfer rows."""
    return np.concatenate([data.features_array(splits.train, splits.schema),
                           data.features_array(splits.transfer, splits.schema)])  # (N, F)


def settings(params: Params) -> logits.CacheSettings:
    return logits.CacheSettings(params.cache.dtype, params.cache.shard_rows, params.cache.top_k,
                                tuple((f.module, f.pool) for f in params.cache.features))


def expected_keys(params: Params, workdir: Path) -> list[str]:
    """The key each teacher's cache must carry to be used with that teacher, the data and the settings."""
    data_fp = data.data_fingerprint(workdir / params.paths.prepared)
    return [logits.cache_key(models.fingerprint(workdir / d), data_fp, settings(params))
            for d in params.teacher_dirs()]


@functools.lru_cache(maxsize=2)
def _teacher_and_rows(teacher_dir: str, prepared_dir: str) -> tuple[models.KDModel, np.ndarray]:
    """Loaded once per process: in the stage, or in each Dask worker."""
    return models.load(Path(teacher_dir))[0], cache_rows(data.read_prepared(Path(prepared_dir)))


@dataclass(frozen=True)
class TeacherLogits:
    """Picklable `compute(start, stop)`: paths travel to Dask workers, not tensors."""

    teacher_dir: str
    prepared_dir: str
    batch_size: int
    features: tuple[tuple[str, str], ...] = ()  # (module, pool): captured in the same forward passes

    @torch.inference_mode()
    def __call__(self, start: int, stop: int) -> torch.Tensor | tuple[torch.Tensor, logits.Features]:
        teacher, x = _teacher_and_rows(self.teacher_dir, self.prepared_dir)
        outs, feats = [], []
        with features.captured(teacher, [m for m, _ in self.features]) as acts:
            for i in range(start, stop, self.batch_size):
                outs.append(teacher(torch.from_numpy(x[i:min(i + self.batch_size, stop)])))  # (b, K)
                feats.append([features.pool(acts[m], p) for m, p in self.features])  # [(b, *S)]
        if not self.features:
            return torch.cat(outs)  # (stop - start, K)
        return torch.cat(outs), [torch.cat(f) for f in zip(*feats, strict=True)]


def _feature_shapes(params: Params, teacher_dir: Path, schema: data.Schema) -> tuple[features.Shape, ...]:
    """Check both feature lists against the teacher and student before the teacher runs; the
    captured features' per-row shapes (none without `cache.features`)."""
    if not params.cache.features:
        return ()
    return features.check(params, models.load(teacher_dir)[0], schema)


def run(params: Params, workdir: Path) -> CacheResult:
    """Cache each teacher's logits in its own cache: an unchanged member's cache is reused from the store."""
    prepared_dir = workdir / params.paths.prepared
    splits = data.read_prepared(prepared_dir)
    n_rows = len(splits.train) + len(splits.transfer)
    reports = []
    for i, (t_dir, l_dir, key) in enumerate(zip(params.teacher_dirs(), params.logit_dirs(),
                                                expected_keys(params, workdir), strict=True)):
        teacher_dir = workdir / t_dir
        meta = {"teacher_fingerprint": models.fingerprint(teacher_dir),
                "data_fingerprint": data.data_fingerprint(prepared_dir),
                "labelled_rows": len(splits.train), "transfer_rows": len(splits.transfer)}
        shapes = _feature_shapes(params, teacher_dir, splits.schema)
        compute = TeacherLogits(str(teacher_dir.resolve()), str(prepared_dir.resolve()), params.cache.batch_size,
                                settings(params).features)
        label = "caching teacher logits" + (f" ({i + 1}/{len(params.teacher_list)})" if params.teachers else "")
        reports.append(logits.build_cache(compute, n_rows, len(splits.schema.classes), workdir / l_dir,
                                          workdir / params.paths.work, key, settings(params), meta,
                                          params.cache.runner, params.cache.dask_address,
                                          progress=progress.bar(label), feature_shapes=shapes))
    return CacheResult(tuple(reports))
