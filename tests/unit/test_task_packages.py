"""A task is one package: generic modules never name a task, tasks never import each other, a stage
loads only the task its params name, and dvc.yaml lists only the selected task's package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kd_core import codedeps, tasks
from tests.conftest import ROOT

KD = ROOT / "kd_core"
TASK_DIRS = {name: KD / "tasks" / name for name in tasks.names()}
# the same word, not a task: each with why
ALLOWED = {
    ("kd_core/models.py", tasks.DEFAULT): "DEFAULT_TASK: params.yaml without `task:`, the first releases' model.json",
    ("kd_core/alerts.py", "text"): "the message field of a chat webhook's JSON",
    ("kd_core/config.py", "text"): "data.text_column's default column name",
    ("kd_core/data.py", "text"): "schema.json's key for how documents become token ids",
    ("kd_core/data.py", "image"): "schema.json's key for how images become model inputs",
    ("kd_core/config.py", "image"): "data.image_column's default column name",
    ("kd_core/card/render.py", "image"): "markdown-it's render rule for images in the model card",
}


def _generic_files() -> list[Path]:
    return sorted(p for p in KD.rglob("*.py") if not any(d in p.parents for d in TASK_DIRS.values()))


def _imports(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
    return found


def mentions(source: str, rel: str, names: tuple[str, ...]) -> list[str]:
    """Where a module names a task: a string constant equal to a task name (`params.task == "lm"`, a
    lookup by name), also inside f-strings, or an import of a task package."""
    tree = ast.parse(source)
    out = [f"{rel}:{n.lineno}: the string {n.value!r}" for n in ast.walk(tree)
           if isinstance(n, ast.Constant) and n.value in names and (rel, n.value) not in ALLOWED]
    out += [f"{rel}: imports kd_core.tasks.{t}" for t in sorted({m.split(".")[2] for m in _imports(tree)
                                                                if m.split(".")[:2] == ["kd_core", "tasks"]
                                                                and len(m.split(".")) > 2}) if t in names]
    return out


def test_no_generic_module_names_a_task() -> None:
    found = [m for p in _generic_files()
             for m in mentions(p.read_text(), p.relative_to(ROOT).as_posix(), tasks.names())]
    assert found == [], "generic code asks the task (kd_core/tasks/base.py) instead:\n" + "\n".join(found)


def test_the_check_finds_a_branch_a_lookup_and_an_import() -> None:
    planted = ('from kd_core.tasks.lm import models\n'
               'def f(params):\n    return params.task == "lm" or TASKS["text"] or f"task {\'tabular\'}"\n')
    assert len(mentions(planted, "kd_core/x.py", ("tabular", "text", "lm"))) == 4
    assert mentions('x = "language model"  # lm, text\n', "kd_core/x.py", ("lm", "text")) == []


@pytest.mark.parametrize("name", tasks.names())
def test_tasks_do_not_import_each_other(name: str) -> None:
    others = tuple(t for t in tasks.names() if t != name)
    found = [m for p in sorted(TASK_DIRS[name].rglob("*.py"))
             for m in mentions("\n".join(f"import {i}" for i in _imports(ast.parse(p.read_text()))),
                               p.relative_to(ROOT).as_posix(), others) if "imports" in m]
    assert found == []


def test_a_task_is_loaded_only_when_asked_for() -> None:
    """Reading params and asking for the table task imports neither transformers nor another task."""
    code = ("import sys; from kd_core import tasks; tasks.get('tabular'); "
            "print(sorted(m for m in sys.modules if m.startswith('kd_core.tasks.') or m == 'transformers'))")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    loaded = eval(got.stdout)  # a list literal printed by the child
    assert "transformers" not in loaded
    assert {m.split(".")[2] for m in loaded} == {"base", "tabular"}


def test_an_unknown_task_is_one_line() -> None:
    with pytest.raises(Exception, match="task 'speech' is not one this kd knows"):
        tasks.get("speech")


def test_stage_deps_name_the_selected_task_package_only() -> None:
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    for stage, body in doc["stages"].items():
        deps = [str(d) for d in body["deps"]]
        assert not [d for d in deps if any(d.startswith(f"kd_core/tasks/{t}/") or d == f"kd_core/tasks/{t}"
                                           for t in tasks.names())], stage
        if "kd_core/tasks/__init__.py" in deps:
            assert codedeps.TASK_DEP in deps, stage
    assert "__pycache__/" in (ROOT / ".dvcignore").read_text().split()  # bytecode is not a code change


def test_shared_code_under_tasks_is_not_a_task() -> None:
    """`kd_core/tasks/_name/` (shared helpers) is neither a task nor a dvc.yaml task package."""
    assert all(not n.startswith("_") for n in tasks.names())
    assert codedeps.task_names() == list(tasks.names())
