"""`task: image` against the real world: kill -9 in the middle of the teacher's pass over the views, then
resume; and the packaged data, Fashion-MNIST from the Debian package, through the stages on a few hundred
images. The run that is killed is a `kd` subprocess; every other stage runs the same entry point in this
process (kd_here, tests/image/conftest.py), sparing a fresh interpreter's imports per stage."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from kd_core.tasks.image import data as image_data
from tests.conftest import BIN
from tests.image.conftest import image_project, kd_here

pytestmark = pytest.mark.slow


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.fault("kill -9 mid view capture")
def test_kill_9_mid_view_capture_resumes_to_the_same_bytes(tmp_path: Path, shape_folders: Path, tally) -> None:
    """8 views per image in shards of 64 rows (eight images): 42 shards, long enough to be killed mid-way."""
    change = {"cache": {"views": 8, "shard_rows": 64, "batch_size": 4}, "teacher": {"epochs": 1}}
    with image_project(tmp_path, shape_folders, change) as proj:
        for stage in ("prepare", "teacher"):
            assert kd_here(proj, "stage", stage).returncode == 0
        store = proj / ".kd/cache"
        proc = subprocess.Popen([str(BIN / "kd"), "stage", "cache_logits"], cwd=proj, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and len(list(store.glob("*/*.logits.npy.sha256"))) < 5:
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done = len(list(store.glob("*/*.logits.npy.sha256")))
        assert 5 <= done < 42, done
        assert len(list(store.glob("*/views.npy.sha256"))) == 1  # the views were written before any shard
        res = kd_here(proj, "stage", "cache_logits")
        assert res.returncode == 0 and "resumed" in res.stdout, res.stdout + res.stderr
        resumed = int(res.stdout.split(" resumed")[0].rsplit(", ", 1)[1])
        assert resumed >= done - 1  # at most the shard being written when killed is lost
        crashed = _files(proj / "artifacts/logits")
        assert kd_here(proj, "cache", "gc", "--keep", "0").returncode == 0  # clean: compute all again
        assert kd_here(proj, "stage", "cache_logits").returncode == 0
        tally.lost(sum(len(v) for k, v in _files(proj / "artifacts/logits").items() if crashed.get(k) != v))
        assert _files(proj / "artifacts/logits") == crashed
        assert kd_here(proj, "cache", "verify", "artifacts/logits").returncode == 0


@pytest.mark.skipif(not (image_data.fashion_mnist_dir() / "t10k-labels-idx1-ubyte.gz").is_file(),
                    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
def test_fashion_mnist_flows_through_the_stages(tmp_path: Path, shape_folders: Path) -> None:
    """The example's source on 300 labelled and 300 transfer images: prepared, validated, a teacher that
    learns, a view cache, a student that learns from it."""
    change = {"data": {"source": "fashion_mnist", "per_class": 30, "transfer_size": 300, "image_size": None,
                       "train": None, "test": None, "transfer": None},
              "teacher": {"epochs": 3}, "cache": {"views": 2}, "train": {"epochs": 2}}
    with image_project(tmp_path, shape_folders, change) as proj:
        said = {}
        for stage in ("prepare", "validate", "teacher", "cache_logits", "train_student"):
            res = kd_here(proj, "stage", stage)
            assert res.returncode == 0, f"{stage}: {res.stderr[-2000:]}"
            said[stage] = res.stdout
        assert "10 classes; a row is a greyscale image (28×28 pixels)" in said["prepare"]
        assert "1200 rows × 10 classes" in said["cache_logits"]  # (300 + 300) images × 2 views
