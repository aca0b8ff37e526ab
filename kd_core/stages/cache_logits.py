"""cache_logits: run the teacher once over train + transfer rows and cache its raw logits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kd_core import data, logits, models
from kd_core.config import Params


@dataclass(frozen=True)
class CacheResult:
    report: logits.CacheReport

    def summary(self) -> str:
        r = self.report
        if r.unchanged:
            return f"logit cache {r.key[:12]} is up to date ({r.rows} rows × {r.classes} classes): nothing to do"
        return (f"cached {r.rows} rows × {r.classes} classes as {r.shards} shard(s), key {r.key[:12]} "
                f"({r.computed} computed, {r.reused} resumed)")


def cache_rows(splits: data.Splits) -> np.ndarray:
    """The rows the student learns from, in cache order: labelled train rows, then transfer rows."""
    return np.concatenate([data.features_array(splits.train, splits.schema),
                           data.features_array(splits.transfer, splits.schema)])  # (N, F)


def expected_key(params: Params, workdir: Path) -> str:
    """The key a cache must carry to be used with the current teacher, data and cache settings."""
    return logits.cache_key(models.fingerprint(workdir / params.paths.teacher),
                            data.data_fingerprint(workdir / params.paths.prepared), settings(params))


def settings(params: Params) -> logits.CacheSettings:
    return logits.CacheSettings(params.cache.dtype, params.cache.shard_rows)


def run(params: Params, workdir: Path) -> CacheResult:
    splits = data.read_prepared(workdir / params.paths.prepared)
    teacher, _ = models.load(workdir / params.paths.teacher)
    x = cache_rows(splits)
    bs = params.cache.batch_size

    @torch.inference_mode()
    def compute(start: int, stop: int) -> torch.Tensor:  # (stop - start, K)
        return torch.cat([teacher(torch.from_numpy(x[i:min(i + bs, stop)]))
                          for i in range(start, stop, bs)])

    meta = {"teacher_fingerprint": models.fingerprint(workdir / params.paths.teacher),
            "data_fingerprint": data.data_fingerprint(workdir / params.paths.prepared),
            "labelled_rows": len(splits.train), "transfer_rows": len(splits.transfer)}
    report = logits.build_cache(compute, len(x), len(splits.schema.classes), workdir / params.paths.logits,
                                workdir / params.paths.work, expected_key(params, workdir),
                                settings(params), meta)
    return CacheResult(report)
