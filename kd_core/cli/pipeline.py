"""`kd stage`, `kd run`, `kd serve`: the DAG one stage at a time, as a Prefect flow, and on schedule."""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from kd_core.cli.app import app, examples, out, project_root, rich_table
from kd_core.cli.progress_bars import progress_bars
from kd_core.config import load_params, set_params
from kd_core.errors import UserError
from kd_core.metrics_table import headline, models_table
from kd_core.stages import STAGES


@app.command(epilog=examples("kd stage prepare", "kd stage train_student",
                                     "dvc repro   (runs every stale stage this way, in DAG order)"))
def stage(name: Annotated[str, typer.Argument(help=f"one of: {', '.join(STAGES)}")]) -> None:
    """Run one DAG stage in this project: what dvc.yaml calls, with progress bars on a terminal."""
    if name not in STAGES:
        raise UserError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    root = project_root()
    params = load_params(root)
    module = importlib.import_module(f"kd_core.stages.{name}")
    try:
        with progress_bars():  # rows/s and ETA for caching and training, on a terminal
            result = module.run(params, root)
    finally:
        tracking = sys.modules.get("kd_core.tracking")  # imported only where a stage logged to MLflow
        if tracking is not None:
            tracking.flush_live_metrics()
    print(f"{name}: {result.summary()}")


@app.command(epilog=examples("kd run", "kd run --set distill.temperature=2 --set train.epochs=60",
                                     "kd run -S data.source=parquet -S data.train=data/raw/train.parquet "
                                     "-S data.test=data/raw/test.parquet"))
def run(
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-S", help="edit params.yaml before running, e.g. --set distill.temperature=2")] = None,
) -> None:
    """Run the whole DAG as a Prefect flow (DVC skips what is up to date); --set edits params.yaml first."""
    root = project_root()
    params = set_params(root, set_) if set_ else load_params(root)
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no phoning home from CI
    from flows.distill import StageFailed, run_dag  # lazy: Prefect loads only for orchestration

    try:
        outcomes = run_dag(root)
    except StageFailed as exc:
        raise UserError(str(exc)) from None
    for o in outcomes:
        out.print(f"  {o.stage:<15} {'ran' if o.ran else 'up to date'}")
    _print_summary(root / params.paths.metrics)
    card = root / params.paths.reports / "model_card.html"
    if card.exists():
        out.print(f"model card: {card.relative_to(root)}; more: kd status, kd compare, kd predict TABLE.parquet")


def _print_summary(metrics: Path) -> None:
    ev = json.loads((metrics / "eval.json").read_text())
    export = metrics / "export.json"
    t = models_table(ev, json.loads(export.read_text()) if export.exists() else None)
    out.print(rich_table(t, "teacher / baseline / student (test set)", out.width))
    out.print(headline(ev))
    reg_path = metrics / "register.json"
    if reg_path.exists():
        reg = json.loads(reg_path.read_text())
        out.print(f"promotion: [bold]{reg['decision']}[/bold] — {reg['model_name']} "
                  f"version {reg['version']} aliases {reg['aliases']}")
        for reason in reg["reasons"]:
            out.print(f"  {reason}")


@app.command(epilog=examples("kd serve"))
def serve() -> None:
    """Run the DAG on schedule.cron from this machine (Prefect serve); Ctrl-C stops."""
    root = project_root()
    params = load_params(root)
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.schedule import serve_distill  # lazy: Prefect loads only for orchestration

    serve_distill(root, params)
