"""dvc.yaml's code deps are each stage's import closure, so a code change re-runs the stages it affects."""

from __future__ import annotations

from pathlib import Path

import yaml

from kd_core import codedeps
from kd_core.stages import STAGES
from tests.conftest import ROOT


def _package(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def test_dvc_yaml_lists_exactly_the_code_each_stage_runs() -> None:
    assert codedeps.drift(ROOT) == {}, "run: python -m kd_core.codedeps --write"


def test_every_stage_of_the_dag_has_code_deps() -> None:
    doc = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert set(doc["stages"]) == set(STAGES)
    for stage in STAGES:
        assert f"kd_core/stages/{stage}.py" in codedeps.listed_deps(doc, stage)


def test_closure_follows_lazy_imports_submodule_names_and_package_inits(tmp_path: Path) -> None:
    _package(tmp_path, {
        "kd_core/__init__.py": "",
        "kd_core/stages/__init__.py": "",
        "kd_core/stages/a.py": "from typing import TYPE_CHECKING\nfrom kd_core import b, c\n"
                               "if TYPE_CHECKING:\n    from kd_core import unused\n",
        "kd_core/b.py": "def f():\n    from kd_core.sub.d import g\n    return g\n",
        "kd_core/c.py": "import os\n",
        "kd_core/sub/__init__.py": "from kd_core import e\n",
        "kd_core/sub/d.py": "g = 1\n",
        "kd_core/e.py": "",
        "kd_core/unused.py": "",
        "kd_core/stages/other.py": "",
    })
    assert codedeps.stage_deps("a", tmp_path) == [
        "kd_core/__init__.py", "kd_core/b.py", "kd_core/c.py", "kd_core/e.py", "kd_core/stages/__init__.py",
        "kd_core/stages/a.py", "kd_core/sub/__init__.py", "kd_core/sub/d.py"]


def test_drift_names_missing_and_extra_files_and_write_fixes_them(tmp_path: Path) -> None:
    _package(tmp_path, {
        "kd_core/__init__.py": "",
        "kd_core/stages/__init__.py": "",
        "kd_core/stages/a.py": "from kd_core import b\n",
        "kd_core/b.py": "",
        "kd_core/old.py": "",
        "dvc.yaml": "stages:\n  a:\n    cmd: kd stage a\n    deps:\n      - kd_core/stages/a.py\n"
                    "      - kd_core/old.py  # stale\n      - data/raw\n",
    })
    assert codedeps.drift(tmp_path) == {"a": (["kd_core/__init__.py", "kd_core/b.py",
                                                "kd_core/stages/__init__.py"], ["kd_core/old.py"])}
    codedeps.write(tmp_path)
    assert codedeps.drift(tmp_path) == {}
    assert yaml.safe_load((tmp_path / "dvc.yaml").read_text())["stages"]["a"]["deps"][-1] == "data/raw"
