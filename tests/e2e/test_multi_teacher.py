"""Several teachers through `dvc repro`: each member trained, cached and scored on its own, the student
learns from their ensemble, and a change to one member recomputes only that member's cache."""

import json
import re

import pytest

from kd_core.cache import read_manifest
from tests.conftest import dvc, write_params

pytestmark = pytest.mark.slow
TEACHERS = [{"arch": "cnn1d", "options": {"channels": 32}, "epochs": 6},
            {"arch": "mlp", "options": {"hidden": [128]}, "epochs": 6}]


def test_two_teachers_ensemble_and_per_member_caches(project):
    write_params(project, {"teachers": TEACHERS, "distill": {"ensemble": "probs"}})
    first = dvc(project, "repro", "evaluate")
    assert first.returncode == 0, first.stdout + first.stderr

    ev = json.loads((project / "metrics/eval.json").read_text())
    assert [m["arch"] for m in ev["teachers"]] == ["cnn1d", "mlp"]
    assert ev["teacher"]["params"] == sum(m["params"] for m in ev["teachers"])  # the ensemble is both
    assert ev["teacher"]["macs"] == sum(m["macs"] for m in ev["teachers"])
    assert all(0.0 <= m["accuracy"] <= 1.0 for m in ev["teachers"])
    keys = [read_manifest(project / f"artifacts/logits/{i}")["key"] for i in (0, 1)]
    assert keys[0] != keys[1]
    assert not (project / "artifacts/logits/manifest.json").exists()

    write_params(project, {"teachers": [TEACHERS[0], {**TEACHERS[1], "epochs": 3}]})
    second = dvc(project, "repro", "evaluate")
    assert second.returncode == 0, second.stdout + second.stderr
    # member 0 retrains to the same weights (seeded CPU run), so its cache is reused, not recomputed
    runs = re.findall(r"(already complete|computed)", second.stdout)
    assert runs == ["already complete", "computed"], second.stdout
    assert read_manifest(project / "artifacts/logits/0")["key"] == keys[0]
    assert read_manifest(project / "artifacts/logits/1")["key"] != keys[1]
