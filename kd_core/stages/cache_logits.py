"""cache_logits: run the teacher once over train + transfer rows and cache its raw logits.

With `cache.features`, the listed teacher activations are captured in the same pass and cached with them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from kd_core import cache, data, distributed, features, progress, tasks
from kd_core.cache import cluster
from kd_core.config import Params


@dataclass(frozen=True)
class CacheResult:
    reports: tuple[cache.CacheReport, ...]  # one per teacher

    def summary(self) -> str:
        return "; ".join(_describe(r) for r in self.reports)


def _describe(r: cache.CacheReport) -> str:
    if r.unchanged:
        return (f"logit cache {r.key[:12]} already complete ({r.rows} rows × {r.classes} classes, "
                f"{r.bytes_per_row} bytes/row): published it, the teacher did not run")
    return (f"cached {r.rows} rows × {r.classes} classes as {r.shards} shard(s) in {r.seconds:.1f} s, "
            f"key {r.key[:12]} ({r.computed} computed, {r.reused} resumed), {r.bytes_per_row} bytes/row")


def _feature_shapes(params: Params, task: tasks.Task, teacher_dir: Path, schema: data.Schema,
                    workdir: Path) -> tuple[features.Shape, ...]:
    """Check both feature lists against the teacher and student before the teacher runs; the
    captured features' per-row shapes (none without `cache.features`)."""
    if not params.cache.features:
        return ()
    return features.check(params, task.load(teacher_dir)[0], schema, task.init_dir(params, workdir), workdir)


def _gpus(params: Params) -> int:
    """GPUs a temporary Dask cluster gives one worker each: those visible when the cache runs on CUDA."""
    return torch.cuda.device_count() if distributed.pick_device(params.cache.device).type == "cuda" else 0


def dask_address(params: Params) -> str | None:
    """The cluster to use: `KD_DASK_ADDRESS` (set by where the run is deployed, e.g. infra/k8s's job
    template) ahead of `cache.dask_address`. Not a param: moving the cluster must not make the cache
    stage stale — the bytes are the same on any cluster."""
    return os.environ.get("KD_DASK_ADDRESS") or params.cache.dask_address


def _runner(params: Params) -> str:
    """An address (`dask_address`) alone means the Dask runner: an address given is a cluster to use.
    Its workers open the teacher, the data and the store as plain paths, so none may be a URL."""
    if not dask_address(params):
        return params.cache.runner
    cluster.check_shared_paths({"paths.work": params.paths.work, "paths.prepared": params.paths.prepared,
                                "paths.teacher": params.paths.teacher})
    return "dask"


def run(params: Params, workdir: Path) -> CacheResult:
    """Cache each teacher's logits in its own cache: an unchanged member's cache is reused from the store."""
    runner, workdir = _runner(params), workdir.resolve()  # a worker resolves nothing in its own cwd
    task = tasks.for_params(params)
    prepared_dir = workdir / params.paths.prepared
    splits = data.read_prepared(prepared_dir)
    settings, amp, gpus = cache.settings(params), cache.autocast(params), _gpus(params)
    x = task.cache_inputs(splits)  # (N, ...) input rows, each holding task.positions(x) cache rows
    # cache.views: each input row's augmented views, drawn once here and stored with the cache
    views = task.draw_views(len(x), settings.views, settings.augment_params()) if settings.views else None
    n_rows = len(x) * task.positions(x) if views is None else len(views)
    device = distributed.pick_device(params.cache.device).type
    reports = []
    for i, (t_dir, l_dir, key) in enumerate(zip(params.teacher_dirs(), params.logit_dirs(),
                                                cache.expected_keys(params, workdir), strict=True)):
        teacher_dir = workdir / t_dir
        meta: dict[str, Any] = {"teacher_fingerprint": task.fingerprint(teacher_dir),
                                "data_fingerprint": data.data_fingerprint(prepared_dir),
                                "labelled_rows": len(splits.train), "transfer_rows": len(splits.transfer)}
        shapes = _feature_shapes(params, task, teacher_dir, splits.schema, workdir)
        compute = cache.TeacherLogits(task.name, str(teacher_dir.resolve()), str(prepared_dir.resolve()),
                                      params.cache.batch_size, settings, len(splits.schema.classes),
                                      params.cache.device, amp is not None,
                                      teacher_fingerprint=meta["teacher_fingerprint"],
                                      data_fingerprint=meta["data_fingerprint"],
                                      views_file="" if views is None else str(
                                          cache.views_path(workdir / params.paths.work, key).resolve()))
        label = "caching teacher logits" + (f" ({i + 1}/{len(params.teacher_list)})" if params.teachers else "")
        reports.append(cache.build_cache(compute, n_rows, len(splits.schema.classes), workdir / l_dir,
                                         workdir / params.paths.work, key, settings, meta,
                                         runner, dask_address(params),
                                         progress=progress.bar(label), feature_shapes=shapes,
                                         autocast=amp, device=device, gpus=gpus, views=views))
    return CacheResult(tuple(reports))
