"""The `kd` app, its sub-apps and what every command shares: the console, help examples, the project root.

Commands live in topic modules (pipeline, registry, cache, outputs), each registering on `app` with
decorators; every import heavier than typer/rich/pydantic happens inside the command that needs it,
so `kd --help` and `kd stage prepare` start fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from kd_core.errors import UserError

if TYPE_CHECKING:
    from kd_core.metrics_table import MetricsTable

out = Console()


def examples(*lines: str) -> str:
    """A help epilog: typer prints it under the options."""
    return "[bold]Examples[/bold]\n\n" + "\n\n".join(f"  {line}" for line in lines)


app = typer.Typer(help="Knowledge-distillation pipeline: validated data, cached teacher logits, "
                       "students promoted by policy.", no_args_is_help=True, add_completion=False,
                  epilog=examples("kd run   (the whole DAG; then open reports/model_card.html)",
                                  "kd status", "kd compare", "kd predict new_rows.parquet"))
cache_app = typer.Typer(help="Inspect the soft-label cache.", no_args_is_help=True,
                        epilog=examples("kd cache verify artifacts/logits", "kd cache ls"))
app.add_typer(cache_app, name="cache")


def project_root() -> Path:
    """The project: the working directory or the nearest parent with dvc.yaml and params.yaml, like
    git and dvc, so `kd predict scored.parquet` works from a subfolder too."""
    cwd = Path.cwd()
    for root in (cwd, *cwd.parents):
        if (root / "dvc.yaml").exists() and (root / "params.yaml").exists():
            return root
    raise UserError(f"{cwd} is not a kd project (no dvc.yaml / params.yaml here or above; "
                    "hint: cd to the project, or `git clone` one)")


def quiet_mlflow() -> None:
    """MLflow draws tqdm bars when it downloads artifacts; the CLI's tables are the output."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def rich_table(t: MetricsTable, title: str, width: int = 400) -> Table:
    """A kd_core.metrics_table table for the console (the card renders the same rows as markdown / HTML):
    names left, numbers right, the candidate's row in bold. On a console too narrow for one row per
    model (`width` columns), models become the columns instead, so no number is ever cut or wrapped."""
    cells = [max(len(h), *(len(r[i]) for r in t.rows)) + 3 for i, h in enumerate(t.header)]
    table = Table(title=title, title_justify="left")
    if sum(cells) + 1 <= width:
        for i, col in enumerate(t.header):
            table.add_column(col, justify="right" if i else "left")
        for row in t.rows:
            table.add_row(*row, style="bold" if row[0] == "student" else None)
        return table
    table.add_column("metric", no_wrap=True)
    for row in t.rows:
        table.add_column(row[0], justify="right", style="bold" if row[0] == "student" else None)
    for i, metric in enumerate(t.header[1:], start=1):
        table.add_row(metric, *(row[i] for row in t.rows))
    return table
