"""Shared fixtures: a throw-away copy of the project in a temporary git repository.

Each project gets its own MLflow sqlite store and Prefect home, so tests never touch the
developer's mlflow.db or .prefect/. Every DVC command of the session shares one DVC cache (a
global DVC config of the session's own): DVC's run-cache then restores a stage that an earlier
test already ran with the same code, params and data instead of computing it again, as it does
for a team sharing a cache. Stages that write to MLflow are never restored that way (dvc.yaml).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.tally import (  # noqa: F401  (hooks: the reliability figure, counted where reports arrive)
    pytest_configure,
    pytest_runtest_logreport,
    pytest_runtest_makereport,
    pytest_terminal_summary,
)

pytest_plugins = ["tests.threads"]  # the xdist workers share the cores (threads per process)
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROJECT_FILES = ["dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", ".gitignore",
                 "data/raw/.gitkeep", "pyproject.toml"]
PROJECT_DIRS = ["kd_core", "flows"]
# Small enough for a 2-core CI, big enough that KD still shows.
# distill.search off, one int8 calibrator and no int8 rule (a 3-epoch student's int8 copy may lose a
# point): tests that need them switch them on.
TINY = {"data": {"transfer_size": 3000}, "teacher": {"epochs": 8}, "train": {"epochs": 3},
        "cache": {"shard_rows": 1024}, "distill": {"search": None}, "export": {"methods": ["minmax"]},
        "policy": {"max_int8_accuracy_drop": None}}


def _dvc_config(config_dir: Path, cache: Path) -> str:
    """A DVC global-config folder whose cache is `cache`; returns the folder for DVC_GLOBAL_CONFIG_DIR."""
    config_dir.mkdir(parents=True, exist_ok=True)
    (config_dir / "config").write_text(f"[core]\n    analytics = false\n[cache]\n    dir = {cache}\n")
    return str(config_dir)


@pytest.fixture(scope="session", autouse=True)
def shared_dvc_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One DVC cache for every test project of the session, through DVC's global config level; under
    pytest-xdist the workers share it too (DVC writes cache objects and run-cache entries atomically)."""
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "dvc-shared-cache"
    os.environ["DVC_GLOBAL_CONFIG_DIR"] = _dvc_config(tmp_path_factory.mktemp("dvc-global"), cache)
    return cache  # DVC_GLOBAL_CONFIG_DIR is inherited by every dvc and kd subprocess


@pytest.fixture
def own_dvc_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A DVC cache of this test's own, for a test that must see every stage compute (live metrics)."""
    cache = tmp_path / "dvc-cache"
    monkeypatch.setenv("DVC_GLOBAL_CONFIG_DIR", _dvc_config(tmp_path / "dvc-global", cache))
    return cache


def deep_update(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        base[k] = deep_update(dict(base.get(k) or {}), v) if isinstance(v, dict) else v
    return base


def write_params(project: Path, overrides: dict) -> None:
    params = yaml.safe_load((project / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump(deep_update(params, overrides), sort_keys=False))


def new_project(proj: Path, overrides: dict, extra_files: tuple[str, ...] = ()) -> Path:
    """The project's code and config copied to `proj`, with `overrides` merged into its params.yaml."""
    for f in [*PROJECT_FILES, *extra_files]:
        (proj / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, proj / f)
    for d in PROJECT_DIRS:
        shutil.copytree(ROOT / d, proj / d, ignore=shutil.ignore_patterns("__pycache__"))
    write_params(proj, overrides)
    return proj


ALL_STAGES = {"prepare", "validate", "teacher", "cache_logits", "train_student", "train_baseline",
              "evaluate", "register", "export", "report"}  # dvc.yaml's stages: what a first `dvc repro` runs
_STALE = re.compile(r"Running stage '([a-z_]+)'|Stage '([a-z_]+)' is cached")


def stages_ran(dvc_stdout: str) -> set[str]:
    """Stages a `dvc repro` found stale: run, or restored from the run-cache of an earlier identical run."""
    return {a or b for a, b in _STALE.findall(dvc_stdout)}


def git(project: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=project, check=True, capture_output=True)


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A committed copy of the project with the tiny config, its own MLflow store and Prefect home."""
    proj = new_project(tmp_path / "proj", TINY)
    for var, value in {"GIT_AUTHOR_NAME": "kd test", "GIT_AUTHOR_EMAIL": "test@kd.invalid",
                       "GIT_COMMITTER_NAME": "kd test", "GIT_COMMITTER_EMAIL": "test@kd.invalid"}.items():
        monkeypatch.setenv(var, value)
    git(proj, "init", "-q")
    git(proj, "add", "-A")
    git(proj, "commit", "-qm", "project")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)  # an earlier test in this process may have set another store
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.chdir(proj)
    return proj


def run_cmd(project: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run a command in the project, capturing text output (never raises on a non-zero exit)."""
    return subprocess.run(list(args), cwd=project, capture_output=True, text=True, timeout=timeout)


def kd(project: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cmd(project, str(BIN / "kd"), *args)


def dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    return run_cmd(project, sys.executable, "-m", "dvc", *args)
