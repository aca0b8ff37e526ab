"""The cache_logits stage on a real project: content addressing, Dask runner, kd cache commands."""

import json

import pytest

from tests.conftest import kd, write_params

pytestmark = pytest.mark.slow


def stage(project, name):
    res = kd(project, "stage", name)
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


def files(path):
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def test_dask_runner_matches_serial_and_store_reuse(project):
    for name in ("prepare", "teacher"):
        stage(project, name)
    out = stage(project, "cache_logits")
    assert "computed" in out
    serial = files(project / "artifacts/logits")

    # same key again: nothing computed, the stored cache is published
    out = stage(project, "cache_logits")
    assert "the teacher did not run" in out

    # Dask with two local workers writes the same bytes (a different key: shard_rows changes)
    write_params(project, {"cache": {"runner": "dask", "shard_rows": 512}})
    stage(project, "cache_logits")
    dask = files(project / "artifacts/logits")
    write_params(project, {"cache": {"runner": "serial"}})
    res = kd(project, "cache", "gc")  # drop the store so the serial run recomputes
    assert res.returncode == 0, res.stderr
    assert "removed 1 cache(s)" in res.stdout
    stage(project, "cache_logits")
    assert files(project / "artifacts/logits") == dask
    assert json.loads(dask["manifest.json"])["key"] != json.loads(serial["manifest.json"])["key"]

    ls = kd(project, "cache", "ls")
    assert ls.returncode == 0 and "current" in ls.stdout
    verify = kd(project, "cache", "verify", "artifacts/logits")
    assert verify.returncode == 0 and "ok" in verify.stdout


def test_student_refuses_a_stale_cache(project):
    for name in ("prepare", "teacher", "cache_logits"):
        stage(project, name)
    write_params(project, {"teacher": {"epochs": 2}})
    stage(project, "teacher")  # a new teacher; the cache on disk is the old one's
    res = kd(project, "stage", "train_student")
    assert res.returncode == 1
    assert res.stderr.strip().startswith("kd: error: logit cache") and "re-run the cache_logits" in res.stderr
    assert "Traceback" not in res.stderr


def test_corrupt_shard_is_caught_by_verify_and_training(project):
    for name in ("prepare", "teacher", "cache_logits"):
        stage(project, name)
    shard = sorted((project / "artifacts/logits").glob("shard-*.npy"))[0]
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x10
    shard.write_bytes(bytes(raw))
    verify = kd(project, "cache", "verify", "artifacts/logits")
    assert verify.returncode == 1 and "checksum mismatch" in verify.stderr
    train = kd(project, "stage", "train_student")
    assert train.returncode == 1 and "checksum" in train.stderr
    assert not (project / "artifacts/student").exists()
    out = stage(project, "cache_logits")  # the bad shard is rebuilt, the others reused
    assert "1 computed" in out
    assert kd(project, "cache", "verify", "artifacts/logits").returncode == 0


def test_device_path_writes_the_stage_bytes(project):
    """The accelerator path (each batch encoded where computed, then copied to the host) run on the
    CPU: the same teacher pass writes exactly the bytes of the stage's cache (top-k and features)."""
    from kd_core import cache, data
    from kd_core.config import load_params

    write_params(project, {"cache": {"top_k": 3, "dtype": "float16", "shard_rows": 700, "batch_size": 64,
                                     "features": [{"module": "net.convs.5", "pool": "mean"}]}})
    for name in ("prepare", "teacher", "cache_logits"):
        stage(project, name)
    params = load_params(project)
    splits = data.read_prepared(project / params.paths.prepared)
    settings, n = cache.settings(params), len(splits.train) + len(splits.transfer)
    classes = len(splits.schema.classes)
    compute = cache.TeacherLogits("tabular", str(project / params.paths.teacher), str(project / params.paths.prepared),
                                  64, settings, classes, "cpu", False, encode_each_batch=True)
    shapes = tuple(tuple(f["shape"]) for f in json.loads((project / "artifacts/logits/manifest.json").read_text())
                   ["features"])
    key = cache.expected_keys(params, project)[0]
    report = cache.build_cache(compute, n, classes, project / "device-path", project / "work2", key, settings,
                               {}, feature_shapes=shapes)
    assert report.computed == report.shards > 1
    stage_files = files(project / "artifacts/logits")
    device_files = files(project / "device-path")
    assert stage_files.keys() == device_files.keys()
    assert {k: v for k, v in stage_files.items() if k.endswith(".npy")} == \
           {k: v for k, v in device_files.items() if k.endswith(".npy")}


def test_sampled_compact_cache_through_the_stages(project):
    """cache.top_p + cache.sampling + compact frames on a real project: the student trains on it, `kd
    cache verify` decodes every frame, and the accelerator path (batches encoded where computed) writes
    the bytes of the stage's CPU path — a row draws the same classes in any batch."""
    from kd_core import cache, data
    from kd_core.config import load_params

    write_params(project, {"cache": {"top_k": 6, "top_p": 0.8, "sampling": 3, "encoding": "compact",
                                     "dtype": "float16", "shard_rows": 700, "batch_size": 64},
                           "distill": {"temperature": 1.0}})
    for name in ("prepare", "teacher", "cache_logits", "train_student"):
        stage(project, name)
    manifest = json.loads((project / "artifacts/logits/manifest.json").read_text())
    assert manifest["encoding"] == "compact" and manifest["sampling"] == 3 and manifest["top_p"] == 0.8
    assert manifest["bytes_per_row"] < 6 * 4 + 4  # smaller than the raw top-6 arrays
    verify = kd(project, "cache", "verify", "artifacts/logits")
    assert verify.returncode == 0 and "ok" in verify.stdout, verify.stdout + verify.stderr

    params = load_params(project)
    splits = data.read_prepared(project / params.paths.prepared)
    settings, n = cache.settings(params), len(splits.train) + len(splits.transfer)
    classes = len(splits.schema.classes)
    compute = cache.TeacherLogits("tabular", str(project / params.paths.teacher), str(project / params.paths.prepared),
                                  50, settings, classes, "cpu", False, encode_each_batch=True)
    key = cache.expected_keys(params, project)[0]
    cache.build_cache(compute, n, classes, project / "device-path", project / "work2", key, settings, {})
    assert {k: v for k, v in files(project / "artifacts/logits").items() if k.endswith(".npy")} == \
           {k: v for k, v in files(project / "device-path").items() if k.endswith(".npy")}

    write_params(project, {"distill": {"loss": "reverse_kl"}})
    res = kd(project, "stage", "train_student")
    assert res.returncode != 0 and "cache.sampling" in res.stderr and "Traceback" not in res.stderr
