"""Student training through the real CLI: kill -9 mid-training resumes to the uninterrupted run's
weights, seeded runs repeat byte for byte, and 2 gloo processes learn what 1 process learns."""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from kd_core import data, models
from kd_core.train import checkpoint_epochs
from tests.conftest import BIN, TINY, deep_update, new_project, write_params
from tests.reliability.conftest import Damage, lost_bytes, snapshot

pytestmark = pytest.mark.slow

# MNIST-1D with fewer transfer rows and epochs than the demo: the student still reaches ~0.75
DEMO = deep_update(dict(TINY), {"data": {"transfer_size": 20000}, "teacher": {"epochs": 20},
                                "train": {"epochs": 20}})
WEIGHTS = Path("artifacts/student") / models.WEIGHTS_FILE
EARLIER = ("data/prepared", "artifacts/teacher", "artifacts/logits")  # what training must not touch


def _env() -> dict[str, str]:
    """No DAG run to log to; one thread per process: on a busy 2-core machine torch's default of two
    threads per process makes each step wait for a descheduled thread, and the test's time balloons."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_RUN_ID"}
    return env | {"OMP_NUM_THREADS": "1"}


def _kd(project: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "kd"), *args], cwd=project, capture_output=True, text=True, env=_env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def ready(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project with prepared data, a teacher and its logit cache: train_student is next."""
    proj = new_project(tmp_path_factory.mktemp("ready") / "proj", DEMO)
    for stage in ("prepare", "teacher", "cache_logits"):
        _kd(proj, "stage", stage)
    return proj


def _copy(ready: Path, dest: Path, overrides: dict | None = None) -> Path:
    shutil.copytree(ready, dest, symlinks=True)
    if overrides:
        write_params(dest, overrides)
    return dest


@pytest.fixture(scope="module")
def uninterrupted(ready: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    proj = _copy(ready, tmp_path_factory.mktemp("clean") / "proj")
    _kd(proj, "stage", "train_student")
    return proj


def _test_accuracy(project: Path) -> float:
    splits = data.read_prepared(project / "data/prepared")
    model, _ = models.load(project / "artifacts/student")
    pred = models.predict_logits(model, data.features_array(splits.test, splits.schema)).argmax(1)
    return float(np.mean(pred == data.label_indices(splits.test, splits.schema)))


def test_seeded_runs_give_byte_identical_weights(ready, uninterrupted, tmp_path):
    again = _copy(ready, tmp_path / "again")
    _kd(again, "stage", "train_student")
    assert (again / WEIGHTS).read_bytes() == (uninterrupted / WEIGHTS).read_bytes()


def _kill_after(proj: Path, stage: str, store: Path, epochs: int) -> int:
    """Run `kd stage <stage>`, kill -9 it once its checkpoint in `store` holds `epochs` epochs; returns
    the epochs the checkpoint kept."""
    proc = subprocess.Popen([str(BIN / "kd"), "stage", stage], cwd=proj, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any(checkpoint_epochs(p) >= epochs for p in store.glob("*.safetensors")):
        assert proc.poll() is None, f"{stage} finished before it could be killed"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    [ckpt] = store.glob("*.safetensors")
    return checkpoint_epochs(ckpt)


@pytest.mark.fault("kill -9 mid training")
def test_sigkill_mid_training_resumes_from_the_checkpoint_to_the_same_weights(ready: Path, uninterrupted: Path,
                                                                              tmp_path: Path, tally: Damage) -> None:
    proj = _copy(ready, tmp_path / "killed")
    earlier = snapshot(proj, EARLIER)
    store = proj / ".kd/train/train_student"
    done = _kill_after(proj, "train_student", store, 3)
    assert 3 <= done < DEMO["train"]["epochs"], done  # really killed mid-training
    assert not (proj / "artifacts/student").exists()  # nothing half-published

    out = _kd(proj, "stage", "train_student").stdout
    tally.lost(lost_bytes(earlier, snapshot(proj, EARLIER)))
    assert f"resumed after epoch {done}" in out, out
    assert (proj / WEIGHTS).read_bytes() == (uninterrupted / WEIGHTS).read_bytes()
    assert not store.exists()  # a finished run leaves no checkpoint behind


def test_two_gloo_processes_reach_the_accuracy_of_one(ready, uninterrupted, tmp_path):
    proj = _copy(ready, tmp_path / "ddp", {"train": {"nproc": 2, "device": "cpu"}})
    out = _kd(proj, "stage", "train_student").stdout
    assert "on 2 processes" in out, out
    single, ddp = _test_accuracy(uninterrupted), _test_accuracy(proj)
    assert single > 0.7
    assert abs(ddp - single) <= 0.01, (single, ddp)


QAD = {"export": {"int8": "qad", "qad_epochs": 6, "methods": ["minmax"]}}


def _int8_logits(project: Path) -> np.ndarray:
    from kd_core import export

    splits = data.read_prepared(project / "data/prepared")
    sess = export.session(project / "artifacts/onnx" / export.INT8_FILE, 1)
    return export._run_onnx(sess, data.features_array(splits.test, splits.schema))


@pytest.mark.fault("kill -9 mid quantization-aware fine-tune")
def test_sigkill_mid_qad_resumes_to_the_same_int8_model(uninterrupted: Path, tmp_path: Path, tally: Damage) -> None:
    clean = _copy(uninterrupted, tmp_path / "clean", QAD)
    _kd(clean, "stage", "export")
    proj = _copy(uninterrupted, tmp_path / "killed", QAD)
    kept = (*EARLIER, "artifacts/student")
    earlier = snapshot(proj, kept)
    store = proj / ".kd/train/export"
    done = _kill_after(proj, "export", store, 2)
    assert 2 <= done < QAD["export"]["qad_epochs"], done
    assert not (proj / "artifacts/onnx").exists()  # nothing half-published

    _kd(proj, "stage", "export")
    tally.lost(lost_bytes(earlier, snapshot(proj, kept)))
    report = json.loads((proj / "metrics/export.json").read_text())
    lineage = report["int8"]["lineage"]
    assert report["int8"]["source"] == "qad" and lineage["qad_resumed_after_epoch"] == str(done)
    manifest = json.loads((proj / "artifacts/logits/manifest.json").read_text())
    assert lineage["cache_key"] == manifest["key"]  # lineage: the cache it fine-tuned against
    assert np.array_equal(_int8_logits(proj), _int8_logits(clean))  # the same int8 model as without the kill
    assert not store.exists()
