"""`dvc repro` with feature distillation on: the DAG runs and reproduces, a hint's weight re-runs only the
student side (the teacher's features stay cached), the saved student has no projection, and a bad module
name is one `kd: error:` line before any compute."""

import json

import pytest
from safetensors.torch import load_file

from tests.conftest import ALL_STAGES, dvc, kd, write_params
from tests.conftest import stages_ran as ran

pytestmark = pytest.mark.slow

CAPTURE = {"module": "net.convs.5", "pool": "mean"}  # the teacher's last conv block: (128, 5) -> (128,)
HINT = {"teacher": "net.convs.5", "student": "net.1", "loss": "mse", "weight": 1.0}  # (256,): a linear projection


def test_repro_with_features(project):
    write_params(project, {"cache": {"features": [CAPTURE]}, "distill": {"features": [HINT]}})
    first = dvc(project, "repro")
    assert first.returncode == 0, first.stdout + first.stderr
    assert ran(first.stdout) == ALL_STAGES
    assert "bytes/row" in first.stdout

    manifest = json.loads((project / "artifacts/logits/manifest.json").read_text())
    assert manifest["features"] == [{"module": "net.convs.5", "pool": "mean", "shape": [128], "role": "feature0"}]
    assert manifest["bytes_per_row"] == 4 * (10 + 128)
    verify = kd(project, "cache", "verify", "artifacts/logits")
    assert verify.returncode == 0, verify.stderr

    weights = load_file(str(project / "artifacts/student/model.safetensors"))
    assert not any("projection" in k for k in weights)
    assert sorted(weights) == sorted(load_file(str(project / "artifacts/baseline/model.safetensors")))
    assert (project / "artifacts/onnx/model.onnx").exists()

    second = dvc(project, "repro")
    assert second.returncode == 0, second.stderr
    assert ran(second.stdout) == set()

    write_params(project, {"distill": {"features": [{**HINT, "weight": 0.3}]}})
    third = dvc(project, "repro")
    assert third.returncode == 0, third.stdout + third.stderr
    assert ran(third.stdout) == {"train_student", "evaluate", "register", "export", "report"}

    write_params(project, {"cache": {"features": [{**CAPTURE, "module": "net.conv.5"}]},
                           "distill": {"features": []}})
    bad = kd(project, "stage", "cache_logits")
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kd: error: cache.features: no module 'net.conv.5'"), bad.stderr
    assert "valid module names: " in lines[0] and "net.convs.5" in lines[0]
