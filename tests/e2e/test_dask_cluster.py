"""`cache.dask_address` against a real cluster: a `dask scheduler` and two `dask worker` processes
started by infra/dask-*.sh, each worker in a folder of its own, sharing nothing with the stage but
the filesystem. The build must be byte-identical to the serial one, survive a worker killed mid-build,
and refuse a teacher that changed after submission."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

import kd_core.cache
from kd_core import data, models
from kd_core.cache import STORE, TeacherLogits, build_cache, cache_key, settings, verify_cache
from kd_core.cache import cluster as dask_cluster
from kd_core.config import load_params
from kd_core.errors import UserError
from kd_core.stages import cache_logits, prepare
from tests.conftest import ROOT, TINY, new_project, write_params

pytestmark = pytest.mark.slow

# 5000 rows in 10 shards: enough shards that a worker can be killed holding one; a small teacher
SMALL = {"data": {"transfer_size": 1000}, "teacher": {"options": {"channels": 8}}, "cache": {"shard_rows": 500}}


@dataclass
class Cluster:
    address: str
    workers: list[subprocess.Popen]  # each the leader of its process group: the nanny and its worker

    def client(self):  # -> distributed.Client, once both workers have joined
        from distributed import Client

        client = Client(self.address, timeout="30s")
        client.wait_for_workers(len(self.workers), timeout=90)
        return client


def _start(script: str, args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    cwd.mkdir()
    log = (cwd / "log.txt").open("w")  # a new session: killpg reaches the nanny and the worker it started
    return subprocess.Popen([str(ROOT / "infra" / script), *args], cwd=cwd, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """The process and every process it started (a worker's nanny and worker), at once."""
    with contextlib.suppress(ProcessLookupError):  # killed by the test already
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _address(scheduler_file: Path, proc: subprocess.Popen) -> str:
    for _ in range(600):
        if scheduler_file.exists() and scheduler_file.stat().st_size:
            return json.loads(scheduler_file.read_text())["address"]
        assert proc.poll() is None, (scheduler_file.parent / "log.txt").read_text()
        time.sleep(0.1)
    raise AssertionError("the Dask scheduler wrote no address in 60 s")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A scheduler on a free localhost port and two workers, as infra/ starts them; torn down always."""
    base = tmp_path_factory.mktemp("dask")
    # PYTHONPATH: workers unpickle SlowTeacher from this module; DASK_*: free ports for parallel sessions
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DASK_PORT": "0", "DASK_DASHBOARD_PORT": "0"}
    procs = [_start("dask-scheduler.sh", ["--scheduler-file", str(base / "scheduler.json")], base / "scheduler", env)]
    try:
        address = _address(base / "scheduler.json", procs[0])
        # --preload: the workers import torch and kd_core while the project is built, not at their first shard
        procs += [_start("dask-worker.sh", [address, "--preload", "kd_core.cache.teacher"], base / f"worker{i}", env)
                  for i in range(2)]
        yield Cluster(address, procs[1:])
    finally:
        for proc in procs:
            _stop(proc)


@pytest.fixture(scope="module")
def project(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny mnist1d project, prepared, with an untrained teacher in place (any teacher shows the bytes
    match; built while the cluster starts)."""
    proj = new_project(tmp_path_factory.mktemp("proj"), TINY)
    write_params(proj, SMALL)
    params = load_params(proj)
    prepare.run(params, proj)
    schema = data.read_prepared(proj / params.paths.prepared).schema
    spec = models.ModelSpec(params.teacher.arch, params.teacher.options, schema)
    models.save(models.build(spec, seed=0), spec, proj / params.paths.teacher)
    return proj


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _drop_store(project: Path) -> None:
    """No shard to resume: the next build computes every one."""
    shutil.rmtree(project / load_params(project).paths.work / STORE, ignore_errors=True)


@pytest.fixture(scope="module")
def serial(project: Path) -> dict[str, bytes]:
    """The serial build's files (shards and manifest), the reference every cluster build must equal."""
    report = cache_logits.run(load_params(project), project).reports[0]
    assert report.computed == report.shards == 10
    _drop_store(project)
    return _files(project / "artifacts/logits")


def _teachers_held() -> int:
    """Run on a worker: the teachers its process has loaded."""
    from kd_core.cache import teacher as cache_teacher

    return len(cache_teacher._loaded)


def _digests(files: dict[str, bytes]) -> list[str]:
    manifest = json.loads(files["manifest.json"])
    return [a["sha256"] for s in manifest["shards"] for a in s["arrays"].values()]


def test_the_cluster_build_is_byte_identical_to_the_serial_one(cluster, project, serial, monkeypatch):
    """The address alone picks the cluster; a relative project path reaches the workers resolved."""
    with cluster.client() as client:
        assert client.run(_teachers_held) == dict.fromkeys(client.scheduler_info()["workers"], 0)
        write_params(project, {"cache": {"dask_address": cluster.address}})  # cache.runner stays serial
        monkeypatch.chdir(project)
        report = cache_logits.run(load_params(project), Path(".")).reports[0]
        held = client.run(_teachers_held)
    assert report.computed == report.shards == 10
    assert all(n == 1 for n in held.values()), held  # every worker computed shards, this process none
    built = _files(project / "artifacts/logits")
    assert _digests(built) == _digests(serial)
    assert built == serial
    assert verify_cache(project / "artifacts/logits") == []


def _compute(project: Path, teacher_dir: Path, **kw) -> TeacherLogits:
    params = load_params(project)
    return TeacherLogits("tabular", str(teacher_dir), str(project / params.paths.prepared), 512, settings(params),
                         10, "cpu", **kw)


def _build(compute: TeacherLogits, out: Path, address: str) -> None:
    splits = data.read_prepared(Path(compute.prepared_dir))
    key = cache_key(compute.teacher_fingerprint, compute.data_fingerprint, compute.settings)
    build_cache(compute, len(splits.train) + len(splits.transfer), 10, out / "logits", out / "work", key,
                compute.settings, {}, "dask", address)


def test_a_teacher_changed_after_submission_is_refused(cluster, project, tmp_path):
    """The stage keyed the cache by one teacher; before a worker loads it, it is retrained in place."""
    moved = tmp_path / "teacher"
    shutil.copytree(project / "artifacts/teacher", moved)
    compute = _compute(project, moved)  # the fingerprints the cache is keyed by
    _, spec = models.load(moved)
    models.save(models.build(spec, seed=123), spec, moved)
    with cluster.client(), pytest.raises(UserError) as err:
        _build(compute, tmp_path, cluster.address)
    line = str(err.value)
    assert line.startswith("Dask worker tcp://127.0.0.1:") and "\n" not in line
    assert f"the teacher at {moved} has fingerprint " in line and f"expected {compute.teacher_fingerprint[:12]}" in line
    assert models.fingerprint(moved)[:12] in line
    assert not (tmp_path / "logits").exists()  # nothing published
    assert not list((tmp_path / "work").rglob("manifest.json"))


def test_a_worker_running_other_kd_core_is_refused(cluster, project, tmp_path):
    compute = _compute(project, project / "artifacts/teacher", code="kd-pipeline 0.0.0 (source 000000000000)")
    with cluster.client(), pytest.raises(UserError, match=r"^Dask worker tcp://127\.0\.0\.1:\d+ runs kd-pipeline "
                                         r".*, the submitting process kd-pipeline 0\.0\.0 \(source 0{12}\)"):
        _build(compute, tmp_path, cluster.address)
    assert not (tmp_path / "logits").exists()


def _never(i: int, start: int, stop: int) -> dict[str, str]:
    raise AssertionError("a worker that does not see the store computed a shard")


def test_a_worker_that_does_not_see_the_store_refuses_before_computing(cluster, tmp_path):
    """As on a worker whose filesystem is not the stage's: the marker this build wrote is not there."""
    with cluster.client() as client, pytest.raises(UserError, match=r"^Dask worker tcp://127\.0\.0\.1:\d+ does not "
                                                   rf"see the cache store {tmp_path}: cache\.dask_address needs"):
        client.submit(dask_cluster._on_worker, _never, str(tmp_path / ".shared-0"), 0, 0, 10).result()


def test_a_url_for_the_store_is_refused_before_any_compute(project):
    params = load_params(project).model_dump()
    params["paths"]["work"] = "s3://bucket/kd"
    params["cache"]["dask_address"] = "tcp://127.0.0.1:1"  # never reached
    from kd_core.config import Params

    with pytest.raises(UserError, match=r"^paths\.work: 's3://bucket/kd' is a URL; cache\.dask_address needs POSIX"):
        cache_logits.run(Params.model_validate(params), project)


@dataclass(frozen=True)
class SlowTeacher(TeacherLogits):
    """The project's teacher, slowed so that a worker is surely killed while it holds a shard."""

    def __call__(self, start: int, stop: int):
        time.sleep(0.5)
        return super().__call__(start, stop)


def _busy_worker(client, store: Path, build: Future) -> str:
    """A worker processing a shard while another shard is already in the store: mid-build."""
    for _ in range(1500):
        assert not build.done(), build.exception() if build.done() else None
        busy = [w for w, keys in client.processing().items() if keys]
        if busy and list(store.glob("*/*.sha256")):
            return busy[0]
        time.sleep(0.02)
    raise AssertionError("no shard was written and no worker busy within 30 s")


def _runs(story: list[tuple], key: str) -> int:
    """How often the scheduler sent `key` to a worker, from its story (location, key, start, finish, …)."""
    return sum(1 for t in story if t[0] == "scheduler" and t[1] == key and t[3] == "processing")


def test_a_worker_killed_mid_build_costs_only_its_shards(cluster, project, serial, monkeypatch):
    """SIGKILL a worker (and its nanny) holding a shard: the scheduler runs it again on the other one."""
    monkeypatch.setattr(kd_core.cache, "TeacherLogits", SlowTeacher)
    write_params(project, {"cache": {"dask_address": cluster.address}})
    _drop_store(project)
    with cluster.client() as client, ThreadPoolExecutor(1) as pool:
        pids = client.run(os.getpid)
        build = pool.submit(cache_logits.run, load_params(project), project)
        victim = _busy_worker(client, project / load_params(project).paths.work / STORE, build)
        held = client.processing()[victim]
        os.killpg(os.getpgid(pids[victim]), signal.SIGKILL)
        report = build.result(timeout=120).reports[0]
        survivors = set(client.scheduler_info()["workers"])
        story = client.story(*held)
    assert victim not in survivors and len(survivors) == 1
    assert any(_runs(story, key) == 2 for key in held), story  # the shards it held ran again elsewhere
    assert report.computed == report.shards == 10
    assert _files(project / "artifacts/logits") == serial
    assert verify_cache(project / "artifacts/logits") == []
