"""Cache shards on a Dask cluster: a temporary one on this machine, or an existing one at
`cache.dask_address` (started with infra/dask-scheduler.sh and infra/dask-worker.sh; docs/dask.md).

What a remote cluster shares is a filesystem, not memory: each task carries paths (teacher, prepared
data, the store) and the identities the submitter keyed the cache by (cache/teacher.py), and writes
its shard straight into the store. So every path is absolute and POSIX, and each task first checks
that its worker sees the very store this build is filling. A worker lost mid-build (SIGKILL, a host
gone) costs only its shards in flight: the scheduler runs them again elsewhere, and the bytes are the
same wherever a shard is computed.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

from kd_core.errors import TransientError, UserError

# A shard whose worker died is run again elsewhere, up to this many deaths; one that kills a third
# worker (the shard itself exhausts memory) fails the build instead of taking the cluster down with it.
ALLOWED_FAILURES = 2

ShardTask = Callable[[int, int, int], dict[str, str]]  # (shard, start, stop) -> {role: sha256}, picklable


def check_shared_paths(paths: Mapping[str, str]) -> None:
    """Refuse what a worker cannot open as a path of the filesystem it shares with the submitter.

    Workers read the teacher and data and write shards with plain file calls, so an fsspec URL
    (s3://, gs://, …) would be taken for a local directory named `s3:` on each worker.
    """
    for name, value in paths.items():
        if "://" in value or value.startswith("::"):
            raise UserError(f"{name}: {value!r} is a URL; cache.dask_address needs POSIX paths on a "
                            "filesystem every worker mounts at the same place (docs/dask.md)")


def local_cluster(n_tasks: int, gpus: int):  # -> distributed.deploy.Cluster
    """A temporary cluster on this machine: one worker per GPU when the teacher runs on GPUs (dask-cuda
    pins each to its own device), else one single-threaded worker process per core."""
    import dask
    from distributed import LocalCluster

    if gpus > 1:
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            raise UserError(f"cache.runner: dask on {gpus} GPUs needs dask-cuda (pip install dask-cuda), "
                            "or give cache.dask_address of a running cluster") from None
    with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES}):
        if gpus > 1:  # memory_limit 0: pinned shard buffers must not count against a worker's share of host RAM
            return LocalCUDACluster(n_workers=gpus, threads_per_worker=1, dashboard_address=None, memory_limit=0)
        workers = 1 if gpus == 1 else min(n_tasks, os.cpu_count() or 1)
        return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None)


def run_dask(task: ShardTask, store: Path, todo: list[tuple[int, int, int]], address: str | None,
             gpus: int = 0) -> dict[int, dict[str, str]]:
    """Run `task` for every (shard, start, stop) of `todo` on the cluster at `address` (else a temporary
    local one); {shard: its digests}. Results are gathered as they come, in any order."""
    from distributed import Client

    if not store.is_absolute():
        raise ValueError(f"the store {store} must be absolute: each worker would resolve it in its own cwd")
    cluster = None
    try:
        if address:
            client = Client(address, timeout="30s")
        else:
            cluster = local_cluster(len(todo), gpus)
            client = Client(cluster)
    except OSError as exc:
        raise TransientError(f"cannot reach the Dask cluster {address}: {exc}") from None
    marker = store / f".shared-{uuid.uuid4().hex}"  # only a worker that sees this store sees this file
    marker.write_text("written by the build that submitted these shards\n")
    try:
        if not client.scheduler_info()["workers"]:
            raise TransientError(f"the Dask cluster {address} has no workers: start some (infra/dask-worker.sh)")
        futures = {client.submit(_on_worker, task, str(marker), i, start, stop, pure=False): i
                   for i, start, stop in todo}
        return _gather(futures)
    finally:
        marker.unlink(missing_ok=True)
        client.close()
        if cluster is not None:
            cluster.close()


def _gather(futures: dict) -> dict[int, dict[str, str]]:
    """Each shard's digests as its task finishes; a shard that killed too many workers is one line."""
    from distributed import as_completed
    from distributed.scheduler import KilledWorker

    done: dict[int, dict[str, str]] = {}
    for future in as_completed(futures):
        try:
            done[futures[future]] = future.result()
        except KilledWorker as exc:
            raise UserError(f"cache shard {futures[future]}: the Dask workers running it died "
                            f"{exc.allowed_failures + 1} time(s), the scheduler's allowed-failures limit: out of "
                            "memory? lower cache.batch_size or cache.shard_rows") from None
    return done


def _on_worker(task: ShardTask, marker: str, i: int, start: int, stop: int) -> dict[str, str]:
    """One shard on a worker, once the worker has shown it sees the store the submitter fills: a
    worker on another filesystem would write shards nobody reads."""
    if not Path(marker).is_file():
        from distributed import get_worker

        raise UserError(f"Dask worker {get_worker().address} does not see the cache store {Path(marker).parent}: "
                        "cache.dask_address needs it on a filesystem every worker mounts at the same path")
    return task(i, start, stop)
