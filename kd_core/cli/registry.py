"""`kd status`, `kd promote`, `kd rollback`, `kd predict`: the model registry, read, moved and used."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.table import Table

from kd_core.cli.app import app, examples, out, project_root, quiet_mlflow
from kd_core.config import load_params
from kd_core.errors import UserError

if TYPE_CHECKING:
    import pandas as pd

    from kd_core.config import Params
    from kd_core.versions import VersionInfo


def _num(metrics: dict[str, float], key: str, fmt: str, scale: float = 1.0) -> str:
    return f"{metrics[key] * scale:{fmt}}" if key in metrics else "–"


def _status_row(v: VersionInfo) -> dict[str, str]:
    m = v.metrics
    color = {"promoted": "green", "rejected": "red"}.get(v.decision)
    has = set(m)
    quality = _lm_quality(m) if "student.perplexity" in has else {}  # task lm: perplexity, lower is better
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
        "int8 ONNX": _int8(v.tags),
        "failed rules": ", ".join(v.failed_rules) or "–",
        "registered (UTC)": v.created,
    } | quality


def _int8(tags: dict[str, str]) -> str:
    """The int8 edge model beside the fp32 one: size, accuracy change, agreement, latency, verdict."""
    if not {"onnx_int8.size_bytes", "onnx_int8.latency_ms_p50"} <= set(tags):
        return "–"
    cells = [f"{float(tags['onnx_int8.size_bytes']) / 1024:.0f} KiB"]
    if "onnx_int8.accuracy_drop" in tags:
        cells.append(f"{-float(tags['onnx_int8.accuracy_drop']) * 100:+.1f} pts")
    if "onnx_int8.agreement_with_pytorch" in tags:
        cells.append(f"{float(tags['onnx_int8.agreement_with_pytorch']) * 100:.1f} % same")
    cells.append(f"{float(tags['onnx_int8.latency_ms_p50']):.3f} ms")
    if tags.get("int8.decision") == "rejected":
        cells.append("[red]rejected[/]")
    return ", ".join(cells)


def _lm_quality(m: dict[str, float]) -> dict[str, str]:
    """The quality columns of an lm version in perplexity: its own, the teacher's over it, the points
    gained over the text-only twin."""
    s = m["student.perplexity"]
    return {"accuracy": f"ppl {s:.2f}",
            "of teacher": f"{m['teacher.perplexity'] / s * 100:.1f} %" if "teacher.perplexity" in m else "–",
            "vs baseline": f"{m['baseline.perplexity'] - s:+.2f} ppl" if "baseline.perplexity" in m else "–"}


_NARROW = ("ver", "aliases", "decision", "accuracy", "vs baseline", "failed rules")  # under 110 columns


def status(root: Path, limit: int) -> None:
    from kd_core import tracking
    from kd_core import versions as versions_

    quiet_mlflow()
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


@app.command("status", epilog=examples("kd status", "kd status --limit 3"))
def status_cmd(limit: Annotated[int, typer.Option(help="newest versions to show (aliased ones always)",
                                                  min=1)] = 10) -> None:
    """Show the model registry: champion, challengers, their key metrics and promotion decisions."""
    status(project_root(), limit)


@app.command(epilog=examples('kd promote 3 --reason "needed for the partner demo"'))
def promote(
    version: Annotated[int, typer.Argument(help="the model version to make champion")],
    reason: Annotated[str, typer.Option("--reason", help="why (goes into the audit trail)")],
    by: Annotated[str | None, typer.Option(help="who (default: user@host)")] = None,
) -> None:
    """Make VERSION the champion by hand, overriding the promotion policy; audited in the registry."""
    root = project_root()
    from kd_core import provenance, registry  # lazy: mlflow loads only for the commands that need it

    print(registry.promote(root, load_params(root), version, reason, by or provenance.current_user()).summary())


@app.command(epilog=examples('kd rollback --reason "canary error rate"'))
def rollback(
    reason: Annotated[str, typer.Option("--reason", help="why (goes into the audit trail)")],
    by: Annotated[str | None, typer.Option(help="who (default: user@host)")] = None,
) -> None:
    """Move champion back to the previous champion; audited in the registry."""
    root = project_root()
    from kd_core import provenance, registry

    print(registry.rollback(root, load_params(root), reason, by or provenance.current_user()).summary())


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

    from kd_core import tasks
    from kd_core import versions as versions_

    quiet_mlflow()
    params = load_params(root)
    frame = _read_table(table_path)
    label = params.data.label_column
    features = frame.drop(columns=[label]) if label in frame.columns else frame  # scoring never sees labels
    classifier = tasks.for_params(params).classifier  # else prompts in, greedy completions out
    if not classifier:
        used, completions = versions_.complete_table(root, params.registry.model_name, version, frame)
        result = pd.DataFrame({"completion": completions})
    else:
        used, classes, probs = versions_.predict_table(root, params.registry.model_name, version, features)
        result = pd.DataFrame({"prediction": classes, "probability": probs.to_numpy().max(axis=1) if len(probs)
                               else []})
        result = pd.concat([result, probs.add_prefix("prob_").reset_index(drop=True)], axis=1)
    dest = dest or default_predictions_path(root, params, table_path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    result.to_parquet(dest, index=False)
    extra = ""
    if label in frame.columns and len(frame) and classifier:
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
