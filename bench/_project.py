"""A throw-away copy of the project in a temporary git repository, as a fresh clone would be: what
the benchmarks that run the pipeline end to end (bench/edge.py, bench/examples.py) start from."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COPY = ["dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", ".gitignore", "data/raw/.gitkeep", "pyproject.toml",
        "kd_core", "flows", "examples"]


def deep_update(base: dict, extra: dict) -> dict:
    for k, v in extra.items():
        base[k] = deep_update(dict(base.get(k) or {}), v) if isinstance(v, dict) else v
    return base


def new_project(dest: Path, params: dict) -> Path:
    """The project's code and config in `dest` with `params` as its params.yaml, committed."""
    for rel in COPY:
        src, dst = ROOT / rel, dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@kd.invalid",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@kd.invalid"}
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "bench"]):
        subprocess.run(["git", *args], cwd=dest, check=True, env=env, capture_output=True)
    return dest


def env(proj: Path) -> dict[str, str]:
    """The environment a user's shell gives a command in `proj`: the venv's tools first, the project's
    own MLflow store, no DAG run inherited from the caller, and the copy's own kd_core imported (not the
    venv's editable install of this checkout, which may change while a benchmark runs)."""
    out = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": f"sqlite:///{proj / 'mlflow.db'}", "PYTHONPATH": str(proj)}
    out.pop("MLFLOW_RUN_ID", None)
    return out


def set_params(proj: Path, change: dict) -> None:
    params = yaml.safe_load((proj / "params.yaml").read_text())
    (proj / "params.yaml").write_text(yaml.safe_dump(deep_update(params, change), sort_keys=False))


def ran(root: Path) -> tuple[Any, Any, Any]:
    """(params, task, prepared splits) of a project `dvc repro` has prepared: what every benchmark that
    reads an existing run starts from. kd_core is imported here, not at the top: bench/examples.py must
    not import the checkout's kd_core (its copies import their own)."""
    from kd_core import data, tasks
    from kd_core.config import load_params

    params = load_params(root)
    return params, tasks.for_params(params), data.read_prepared(root / params.paths.prepared)
