"""`kd status`, `kd compare`, `kd predict`, `kd export` and the progress bars of `kd stage`.

Presentation only (rich tables, typer options); the work is done by kd_core.versions and kd_core.registry,
kd_core.stages.export and the stages. cli.py adds these commands to the `kd` app with `add_to`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from kd_core import progress
from kd_core.config import load_params
from kd_core.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

    from kd_core.config import Params
    from kd_core.versions import VersionInfo

out = Console()
ROLES = ("teacher", "baseline", "student")


def _pts(fraction: float) -> str:
    """A change of accuracy in percentage points, signed; never '-0.0'."""
    return f"{round(fraction * 100, 1) + 0.0:+.1f} pts"


def examples(*lines: str) -> str:
    """A help epilog: typer prints it under the options."""
    return "[bold]Examples[/bold]\n\n" + "\n\n".join(f"  {line}" for line in lines)


# --- progress bars ------------------------------------------------------------------------------------

class RateColumn(ProgressColumn):
    """Throughput in the bar's own unit: '48,213 rows/s'."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "it")
        return Text(f"{task.speed:,.0f} {unit}/s" if task.speed else f"– {unit}/s", style="cyan")


class RichReporter:
    """kd_core.progress.Reporter drawing one rich bar per loop (rows/s, elapsed, ETA) on stderr."""

    def __init__(self, console: Console) -> None:
        self.bars = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                             RateColumn(), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                             console=console, refresh_per_second=8)

    def task(self, description: str, unit: str) -> progress.Progress:
        task_id = None

        def update(done: int, total: int) -> None:
            nonlocal task_id
            if task_id is None:  # rows resumed before the first call are not throughput
                task_id = self.bars.add_task(description, total=total, completed=done, unit=unit)
            else:
                self.bars.update(task_id, completed=done, total=total)

        return update


@contextmanager
def progress_bars(console: Console | None = None) -> Iterator[RichReporter | None]:
    """Bars while the block runs, on a terminal only: captured output (CI, `kd run`'s stage logs)
    stays clean. Under torch.distributed.run only rank 0 draws."""
    console = console or Console(stderr=True)
    if not console.is_terminal or os.environ.get("RANK", "0") != "0":
        yield None
        return
    reporter = RichReporter(console)
    with reporter.bars, progress.reporting(reporter):
        yield reporter


# --- kd status ----------------------------------------------------------------------------------------

def _num(metrics: dict[str, float], key: str, fmt: str, scale: float = 1.0) -> str:
    return f"{metrics[key] * scale:{fmt}}" if key in metrics else "–"


def _quiet_mlflow() -> None:
    """MLflow draws tqdm bars when it downloads artifacts; the CLI's tables are the output."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _status_row(v: VersionInfo) -> dict[str, str]:
    m = v.metrics
    color = {"promoted": "green", "rejected": "red"}.get(v.decision)
    has = set(m)
    return {
        "ver": str(v.version),
        "aliases": ", ".join(v.aliases) or "–",
        "decision": f"[{color}]{v.decision}[/]" if color else v.decision,
        "accuracy": _num(m, "student.accuracy", ".3f"),
        "of teacher": (f"{m['student.accuracy'] / m['teacher.accuracy'] * 100:.1f} %"
                       if m.get("teacher.accuracy") and "student.accuracy" in has else "–"),
        "vs baseline": (f"{(m['student.accuracy'] - m['baseline.accuracy']) * 100:+.1f} pts"
                        if {"student.accuracy", "baseline.accuracy"} <= has else "–"),
        "latency": _num(m, "student.latency_ms_p50", ".3f") + (" ms" if "student.latency_ms_p50" in has else ""),
        "size": _num(m, "student.size_bytes", ",.0f", 1 / 1024) + (" KiB" if "student.size_bytes" in has else ""),
        "int8 ONNX": (f"{float(v.tags['onnx_int8.size_bytes']) / 1024:.0f} KiB, "
                      f"{float(v.tags['onnx_int8.latency_ms_p50']):.3f} ms"
                      if {"onnx_int8.size_bytes", "onnx_int8.latency_ms_p50"} <= set(v.tags) else "–"),
        "failed rules": ", ".join(v.failed_rules) or "–",
        "registered (UTC)": v.created,
    }


_NARROW = ("ver", "aliases", "decision", "accuracy", "vs baseline", "failed rules")  # under 110 columns


def status(root: Path, limit: int) -> None:
    from kd_core import tracking
    from kd_core import versions as versions_

    _quiet_mlflow()
    params = load_params(root)
    name = params.registry.model_name
    versions = versions_.list_versions(root, name, limit, f"{params.paths.metrics}/eval.json")
    rows = [_status_row(v) for v in versions]
    columns = [c for c in (rows[0] if rows else {"ver": ""}) if out.width >= 110 or c in _NARROW]
    table = Table(title=f"{name} in {tracking.tracking_uri(root)}", caption="test-set metrics from each version's "
                  "run; latency p50 at batch 1 on CPU; size of the weights file; rules: `policy` in params.yaml",
                  title_justify="left", caption_justify="left", box=box.SIMPLE_HEAD)
    for col in columns:
        table.add_column(col, justify="left" if col in ("aliases", "decision", "failed rules") else "right")
    for v, row in zip(versions, rows, strict=True):
        table.add_row(*(row[c] for c in columns), style="bold" if "champion" in v.aliases else None)
    out.print(table)
    champion = next((v for v in versions if "champion" in v.aliases), None)
    if champion is None:
        out.print("no champion yet: no version has passed every promotion rule")
    else:
        out.print(f"champion: version {champion.version} ({champion.tags.get('promotion', 'policy')}); serve it "
                  f"with [bold]mlflow models serve -m models:/{name}@champion[/bold], score a table with "
                  "[bold]kd predict FILE.parquet[/bold]")


# --- kd compare ---------------------------------------------------------------------------------------

_ROWS: list[tuple[str, str, Callable[[float], str]]] = [
    ("accuracy", "accuracy", lambda v: f"{v:.3f}"),
    ("ECE (calibration error)", "ece", lambda v: f"{v:.3f}"),
    ("NLL", "nll", lambda v: f"{v:.3f}"),
    ("agreement with teacher", "agreement_with_teacher", lambda v: f"{v:.3f}"),
    ("parameters", "params", lambda v: f"{v:,.0f}"),
    ("MACs per row", "macs", lambda v: f"{v:,.0f}"),
    ("weights size", "size_bytes", lambda v: f"{v / 1024:,.1f} KiB"),
    ("latency p50 (batch 1, CPU)", "latency_ms_p50", lambda v: f"{v:.3f} ms"),
]


def compare(root: Path) -> None:
    params = load_params(root)
    metrics = root / params.paths.metrics
    path = metrics / "eval.json"
    if not path.exists():
        raise UserError(f"{path} not found (hint: `kd run` or `dvc repro evaluate` writes it)")
    ev = json.loads(path.read_text())
    export_path = metrics / "export.json"
    q = json.loads(export_path.read_text())["student"]["onnx_int8"] if export_path.exists() else None
    table = Table(title="teacher / baseline / student on the test set (metrics/eval.json)", title_justify="left")
    table.add_column("metric")
    for role in ROLES:
        table.add_column(role, justify="right", style="bold" if role == "student" else None)
    if q:
        table.add_column("student int8 (ONNX)", justify="right")
    for label, key, fmt in _ROWS:
        cells = [fmt(ev[r][key]) if key in ev[r] else "–" for r in ROLES]
        if q:
            cells.append(fmt(q[key]) if key in q else "–")
        table.add_row(label, *cells)
    out.print(table)
    t, b, s = (ev[r] for r in ROLES)
    out.print(f"student keeps [bold]{s['accuracy'] / t['accuracy'] * 100:.1f} %[/bold] of the teacher's accuracy "
              f"with 1/{t['macs'] / max(s['macs'], 1):.1f} of its MACs and "
              f"{t['latency_ms_p50'] / s['latency_ms_p50']:.1f}× lower latency; distillation adds "
              f"[bold]{(s['accuracy'] - b['accuracy']) * 100:+.1f} points[/bold] over the hard-label baseline")
    if q:
        out.print(f"int8 ONNX: {q['size_bytes'] / 1024:.0f} KiB, accuracy {q['accuracy']:.3f} "
                  f"({_pts(-q['accuracy_drop'])} vs PyTorch), max |Δlogit| {q['max_abs_logit_diff']:.2g}, "
                  f"{q['latency_ms_p50']:.3f} ms (ONNX Runtime)")
    card = root / params.paths.reports / "model_card.html"
    if card.exists():
        out.print(f"model card with figures: {card.relative_to(root)}")


# --- kd predict ---------------------------------------------------------------------------------------

def _read_table(path: Path) -> pd.DataFrame:
    import pandas as pd

    if not path.is_file():
        raise UserError(f"{path} not found (hint: give a parquet table with the model's feature columns)")
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for a file that is not parquet
        raise UserError(f"{path} is not a readable parquet table ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200]}); hint: pandas' df.to_parquet(path) writes one") from None


def default_predictions_path(root: Path, params: Params, table_path: Path) -> Path:
    """Next to the table, unless that folder is one the pipeline reads or writes (data/raw,
    data/prepared, artifacts/, …): a new file there changes a DVC dependency or output, and the
    next `kd run` would redo the whole DAG. Those tables' predictions go to `predictions/`."""
    table = table_path.resolve()
    pipeline_dirs = [(root / p).resolve() for k, p in params.paths.model_dump().items() if k != "work"]
    inside = any(table.is_relative_to(d) for d in pipeline_dirs)
    return (root / "predictions" if inside else table_path.parent) / f"{table_path.stem}.predictions.parquet"


def predict(root: Path, table_path: Path, version: int | None, dest: Path | None) -> None:
    import pandas as pd

    from kd_core import versions as versions_

    _quiet_mlflow()
    params = load_params(root)
    frame = _read_table(table_path)
    label = params.data.label_column
    features = frame.drop(columns=[label]) if label in frame.columns else frame  # scoring never sees labels
    used, classes, probs = versions_.predict_table(root, params.registry.model_name, version, features)
    result = pd.DataFrame({"prediction": classes, "probability": probs.to_numpy().max(axis=1) if len(probs)
                           else []})
    result = pd.concat([result, probs.add_prefix("prob_").reset_index(drop=True)], axis=1)
    dest = dest or default_predictions_path(root, params, table_path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    result.to_parquet(dest, index=False)
    extra = ""
    if label in frame.columns and len(frame):
        truth = frame[label].to_numpy(dtype=object)
        hits = sum(str(p) == str(t) for p, t in zip(classes, truth, strict=True))
        extra = f"; accuracy against its '{label}' column {hits / len(frame):.3f}"
    preview = Table(title=f"{params.registry.model_name} version {used} on {table_path} (first rows)",
                    title_justify="left")
    for col in result.columns[:8]:
        preview.add_column(str(col), justify="right")
    for row in result.head(5).itertuples(index=False):
        preview.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row[:8]))
    out.print(preview)
    out.print(f"{len(result):,} rows scored by version {used}{extra} -> {dest}")


# --- kd export ----------------------------------------------------------------------------------------

def _registered_dir(root: Path, params: Params, version: int) -> Path:
    """Version `version`'s kd model directory, downloaded; it must read the prepared test rows."""
    from kd_core import data, models, serving

    name = params.registry.model_name
    model_dir = serving.download_model_dir(f"models:/{name}/{version}", root / params.paths.work / "export-download",
                                            root=root)
    features = models.load(model_dir)[1].schema.features
    prepared = data.read_prepared(root / params.paths.prepared).schema.features
    if features != prepared:
        raise UserError(f"{name} version {version} reads features {list(features)[:4]}…, the prepared test split "
                        f"has {list(prepared)[:4]}…; export checks a model on matching test rows")
    return model_dir


def export(root: Path, version: int | None, dest: Path | None) -> None:
    from kd_core.stages import export as stage

    _quiet_mlflow()
    params = load_params(root)
    if version is None and dest is None:
        result = stage.run(params, root)  # exactly the DAG stage
    else:
        model_dir = _registered_dir(root, params, version) if version else root / params.paths.student
        dest = dest or root / f"{params.paths.onnx}-v{version}"
        result = stage.export_model(params, root, model_dir, dest, dest / stage.OUTPUT_FILE, version)
    table = Table(title=f"edge export -> {result.out}", title_justify="left")
    for col in ("model, runtime", "file size", "latency p50 (batch 1)", "accuracy", "max |Δlogit| vs PyTorch",
                "accuracy vs PyTorch"):
        table.add_column(col, justify="left" if col == "model, runtime" else "right")
    names = {"pytorch": "PyTorch fp32", "onnx": "ONNX Runtime fp32", "onnx_int8": "ONNX Runtime int8"}
    for role, variants in (("teacher", result.report.teacher), ("student", result.report.student)):
        for k, v in variants.items():
            table.add_row(f"{role}, {names[k]}", f"{v.size_bytes / 1024:,.0f} KiB", f"{v.latency_ms_p50:.3f} ms",
                          f"{v.accuracy:.3f}", "–" if k == "pytorch" else f"{v.max_abs_logit_diff:.2g}",
                          "–" if k == "pytorch" else _pts(-v.accuracy_drop))
    out.print(table)
    where = (f"results attached to {result.model_name} version {result.version}" if result.version is not None
             else "not attached to a model version (no `kd run` registration for it)")
    out.print(f"wrote {result.out / 'model.onnx'} and model.int8.onnx (input 'features': raw rows in model.json's "
              f"feature order; output 'logits'); {where}")


# --- wiring -------------------------------------------------------------------------------------------

def add_to(app: typer.Typer, project_root: Callable[[], Path]) -> None:
    """Register the commands on `app`; `project_root()` finds the project or raises UserError."""

    @app.command("status", epilog=examples("kd status", "kd status --limit 3"))
    def status_cmd(limit: Annotated[int, typer.Option(help="newest versions to show (aliased ones always)",
                                                      min=1)] = 10) -> None:
        """Show the model registry: champion, challengers, their key metrics and promotion decisions."""
        status(project_root(), limit)

    @app.command("compare", epilog=examples("kd compare"))
    def compare_cmd() -> None:
        """Teacher, hard-label baseline and distilled student side by side (from metrics/eval.json)."""
        compare(project_root())

    @app.command("predict", epilog=examples(
        "kd predict new_rows.parquet", "kd predict new_rows.parquet --version 3 --out scored.parquet"),
        help="Score a table with the champion (or a version): writes the predicted class, its probability and "
             "one probability column per class (prob_<class>).")
    def predict_cmd(
        table: Annotated[Path, typer.Argument(help="parquet table with the model's feature columns (any order; "
                                                   "extra columns are ignored)")],
        version: Annotated[int | None, typer.Option("--version", "-v", help="model version (default: the champion)",
                                                    min=1)] = None,
        dest: Annotated[Path | None, typer.Option("--out", "-o", help="where to write the predictions (default: "
                                                  "TABLE.predictions.parquet next to TABLE, or in predictions/ "
                                                  "for a table inside the pipeline's own folders)")] = None,
    ) -> None:
        predict(project_root(), table, version, dest)

    @app.command("export", epilog=examples(
        "kd export", "kd export --version 2", "kd export --version 2 --out edge/"),
        help="Export the student to ONNX and int8 ONNX, check both against PyTorch on the test set, time them "
             "and attach the results to the model version (what the `export` stage runs).")
    def export_cmd(
        version: Annotated[int | None, typer.Option("--version", "-v", help="export this registered version "
                                                    "instead of the current student", min=1)] = None,
        dest: Annotated[Path | None, typer.Option("--out", "-o", help="output folder (default: paths.onnx, or "
                                                  "paths.onnx-vN for a version)")] = None,
    ) -> None:
        export(project_root(), version, dest)
