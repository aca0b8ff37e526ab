"""Worker-side state of the cache's teacher pass: a long-lived Dask cluster must never fill a new cache
with a teacher it loaded before that teacher was retrained at the same path, nor run other code."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kd_core import data, models
from kd_core.cache import CacheSettings, LogitCache, TeacherLogits, build_cache, cache_key
from kd_core.errors import UserError

N_FEATURES, CLASSES = 6, (0, 1, 2)
SETTINGS = CacheSettings("float32", 16, None)


def _prepared(root: Path) -> Path:
    rng = np.random.default_rng(0)

    def frame(n: int, labelled: bool) -> pd.DataFrame:
        df = pd.DataFrame(rng.normal(size=(n, N_FEATURES)).astype(np.float32), columns=[f"x{i}" for i in range(6)])
        df["label"] = rng.integers(0, 3, n) if labelled else -1
        return df

    schema = data.Schema(tuple(f"x{i}" for i in range(N_FEATURES)), "label", CLASSES)
    data.write_prepared(data.Splits(frame(30, True), frame(10, True), frame(20, False), schema), root / "prepared")
    return root / "prepared"


def _teacher(path: Path, seed: int) -> models.KDModel:
    """A teacher saved at `path` (replacing whatever was there), as the teacher stage would."""
    spec = models.ModelSpec("mlp", {"hidden": [8]}, data.Schema(tuple(f"x{i}" for i in range(N_FEATURES)),
                                                               "label", CLASSES))
    model = models.build(spec, seed=seed).eval()
    models.save(model, spec, path)
    return model


def _expected(model: models.KDModel, prepared: Path) -> np.ndarray:
    splits = data.read_prepared(prepared)
    from kd_core import tasks
    return models.predict_logits(model, tasks.get("tabular").cache_inputs(splits))  # (N, C)


def _build(tmp_path: Path, teacher: Path, prepared: Path, name: str, address: str | None) -> np.ndarray:
    compute = TeacherLogits("tabular", str(teacher), str(prepared), 8, SETTINGS, len(CLASSES))
    key = cache_key(compute.teacher_fingerprint, compute.data_fingerprint, SETTINGS)
    n = len(data.read_prepared(prepared).train) + len(data.read_prepared(prepared).transfer)
    runner = "dask" if address else "serial"
    build_cache(compute, n, len(CLASSES), tmp_path / name, tmp_path / "work", key, SETTINGS, {}, runner, address)
    return LogitCache(tmp_path / name, key).take(np.arange(n))


@pytest.mark.parametrize("runner", ["serial", "dask"])
def test_retrained_teacher_at_the_same_path_fills_the_new_cache(tmp_path, runner):
    prepared, teacher = _prepared(tmp_path), tmp_path / "teacher"
    old = _teacher(teacher, seed=1)
    if runner == "serial":
        first = _build(tmp_path, teacher, prepared, "old", None)
        new = _teacher(teacher, seed=2)  # retrained in place; this process still holds the old one
        second = _build(tmp_path, teacher, prepared, "new", None)
    else:
        from distributed import LocalCluster

        with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster:
            first = _build(tmp_path, teacher, prepared, "old", cluster.scheduler_address)
            new = _teacher(teacher, seed=2)  # the worker outlives the teacher it loaded
            second = _build(tmp_path, teacher, prepared, "new", cluster.scheduler_address)
    np.testing.assert_allclose(first, _expected(old, prepared), rtol=1e-5, atol=1e-5)
    assert not np.allclose(second, first)
    np.testing.assert_allclose(second, _expected(new, prepared), rtol=1e-5, atol=1e-5)


def test_a_worker_that_sees_another_teacher_refuses(tmp_path):
    """The submitter keyed the cache by one teacher; the files the worker finds are another."""
    prepared, teacher = _prepared(tmp_path), tmp_path / "teacher"
    _teacher(teacher, seed=1)
    compute = TeacherLogits("tabular", str(teacher), str(prepared), 8, SETTINGS, len(CLASSES))
    _teacher(teacher, seed=3)  # replaced after the task was submitted
    with pytest.raises(UserError, match=r"teacher at .* has fingerprint .* expected "
                                        + compute.teacher_fingerprint[:12]) as err:
        compute(0, 4)
    assert "\n" not in str(err.value)


def test_a_worker_running_other_kd_core_code_refuses(tmp_path):
    prepared, teacher = _prepared(tmp_path), tmp_path / "teacher"
    _teacher(teacher, seed=1)
    compute = TeacherLogits("tabular", str(teacher), str(prepared), 8, SETTINGS, len(CLASSES),
                            code="kd-pipeline 0.0.9 (source 000000000000)")
    with pytest.raises(UserError, match=r"runs kd-pipeline .*\(source [0-9a-f]{12}\), the submitting process "
                                        r"kd-pipeline 0\.0\.9 \(source 000000000000\)") as err:
        compute(0, 4)
    assert "\n" not in str(err.value)
