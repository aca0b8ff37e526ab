"""`dvc repro` in a temporary git repo: the DAG of record runs, is a no-op when nothing changed,
and a temperature change re-runs only the student side."""

import json

import pytest
import yaml

from tests.conftest import dvc, write_params
from tests.conftest import stages_ran as ran

pytestmark = pytest.mark.slow
ALL = {"prepare", "validate", "teacher", "cache_logits", "train_student", "train_baseline",
       "evaluate", "register", "export", "report"}


def test_repro_noop_and_temperature_rerun(project):
    first = dvc(project, "repro")
    assert first.returncode == 0, first.stdout + first.stderr
    assert ran(first.stdout) == ALL
    assert (project / "dvc.lock").exists()
    eval_json = json.loads((project / "metrics/eval.json").read_text())
    assert set(eval_json) >= {"teacher", "student", "baseline"}
    reg = json.loads((project / "metrics/register.json").read_text())
    assert reg["version"] is not None and reg["decision"] in ("promoted", "rejected")

    second = dvc(project, "repro")
    assert second.returncode == 0, second.stderr
    assert ran(second.stdout) == set()
    assert "up to date" in second.stdout

    write_params(project, {"distill": {"temperature": 3.5}})
    third = dvc(project, "repro")
    assert third.returncode == 0, third.stdout + third.stderr
    assert ran(third.stdout) == {"train_student", "evaluate", "register", "export", "report"}

    # a code change makes exactly the stages that import the changed module stale (dvc.yaml's deps are
    # generated from the import closures: kd_core/codedeps.py)
    # a task is one package and dvc.yaml names only the selected one (kd_core/tasks/${task}): an edit to the
    # lm package leaves this tabular project up to date; one to its own package makes every stage that asks
    # the task stale
    asks_task = {name for name, body in yaml.safe_load((project / "dvc.yaml").read_text())["stages"].items()
                 if "kd_core/tasks/${task}" in body["deps"]}
    assert {"prepare", "teacher", "train_student", "evaluate"} <= asks_task
    for module, stale in (("kd_core/card/figures.py", {"report"}), ("kd_core/export.py", {"export"}),
                          ("kd_core/losses.py", {"teacher", "cache_logits", "train_student", "train_baseline",
                                                 "export"}),  # export: its quantization-aware fine-tune
                          ("kd_core/tasks/lm/task.py", set()), ("kd_core/tasks/tabular/task.py", asks_task)):
        path = project / module
        original = path.read_text()
        path.write_text(original + "\n# an edit\n")
        status = dvc(project, "status", "--json")
        path.write_text(original)
        assert status.returncode == 0, status.stderr
        assert set(json.loads(status.stdout)) == stale, (module, status.stdout)
