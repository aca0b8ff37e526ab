"""`kd compare` and `kd export`: the run's models side by side, and the student on the edge (ONNX, or
GGUF for llama.cpp where the task has a `gguf` module)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from kd_core.cli.app import app, examples, out, project_root, quiet_mlflow, rich_table
from kd_core.config import load_params
from kd_core.errors import UserError
from kd_core.metrics_table import MetricsTable, export_table, headline, kib, models_table, pts

if TYPE_CHECKING:
    from kd_core.config import Params


def compare(root: Path) -> None:
    params = load_params(root)
    metrics = root / params.paths.metrics
    path = metrics / "eval.json"
    if not path.exists():
        raise UserError(f"{path} not found (hint: `kd run` or `dvc repro evaluate` writes it)")
    ev = json.loads(path.read_text())
    export_path = metrics / "export.json"
    export = json.loads(export_path.read_text()) if export_path.exists() else None
    title = "teacher / baseline / student on the test set (metrics/eval.json)"
    out.print(rich_table(models_table(ev, export), title, out.width))
    out.print(headline(ev))
    q = (export or {}).get("student", {}).get("onnx_int8")
    if q and "perplexity" in q:
        assert export is not None  # q is its student's int8 entry
        out.print(f"int8 ONNX: {kib(q['size_bytes'])}, perplexity {q['perplexity']:.2f} (PyTorch "
                  f"{export['student']['pytorch']['perplexity']:.2f}), max |Δlogit| {q['max_abs_logit_diff']:.2g}, "
                  f"{q['latency_ms_p50']:.3f} ms (ONNX Runtime)")
    elif q:
        out.print(f"int8 ONNX: {kib(q['size_bytes'])}, accuracy {q['accuracy']:.3f} "
                  f"({pts(-q['accuracy_drop'])} vs PyTorch), max |Δlogit| {q['max_abs_logit_diff']:.2g}, "
                  f"{q['latency_ms_p50']:.3f} ms (ONNX Runtime)")
    card = root / params.paths.reports / "model_card.html"
    if card.exists():
        out.print(f"model card with figures: {card.relative_to(root)}")


@app.command("compare", epilog=examples("kd compare"))
def compare_cmd() -> None:
    """Teacher, hard-label baseline and distilled student side by side (from metrics/eval.json)."""
    compare(project_root())


def _registered_dir(root: Path, params: Params, version: int) -> Path:
    """Version `version`'s kd model directory, downloaded; it must read the prepared test rows."""
    from kd_core import data, serving, tasks

    name = params.registry.model_name
    model_dir = serving.download_model_dir(f"models:/{name}/{version}", root / params.paths.work / "export-download",
                                            root=root)
    features = tasks.load_model(model_dir)[1].schema.features
    prepared = data.read_prepared(root / params.paths.prepared).schema.features
    if features != prepared:
        raise UserError(f"{name} version {version} reads features {list(features)[:4]}…, the prepared test split "
                        f"has {list(prepared)[:4]}…; export checks a model on matching test rows")
    return model_dir


def export(root: Path, version: int | None, dest: Path | None) -> None:
    from kd_core.stages import export as stage

    quiet_mlflow()
    params = load_params(root)
    if version is None and dest is None:
        result = stage.run(params, root)  # exactly the DAG stage
    else:
        model_dir = _registered_dir(root, params, version) if version else root / params.paths.student
        dest = dest or root / f"{params.paths.onnx}-v{version}"
        result = stage.export_model(params, root, model_dir, dest, dest / stage.OUTPUT_FILE, version)
    out.print(rich_table(export_table(result.report.to_json()), f"edge export -> {result.out}", out.width))
    where = (f"results attached to {result.model_name} version {result.version}" if result.version is not None
             else "not attached to a model version (no `kd run` registration for it)")
    out.print(f"wrote {result.out / 'model.onnx'} and model.int8.onnx (input 'features': raw rows in model.json's "
              f"feature order; output 'logits'); {where}")


def export_gguf(root: Path, version: int | None, dest: Path | None) -> None:
    """The student as GGUF files, written and checked by its task's `gguf` module (a task without one has
    no GGUF export: one line, no traceback)."""
    quiet_mlflow()
    params = load_params(root)
    name = f"kd_core.tasks.{params.task}.gguf"
    try:
        gguf = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not name.startswith(exc.name):
            raise  # a library the module needs is missing: not this task's choice
        raise UserError(f"task {params.task!r} has no GGUF export (GGUF holds llama.cpp language models); "
                        "`kd export` writes ONNX") from None
    model_dir = _registered_dir(root, params, version) if version else root / params.paths.student
    default = root / gguf.default_out(params)
    dest = dest or (Path(f"{default}-v{version}") if version else default)
    checks = gguf.run(params, root, model_dir, dest)
    rows = tuple((fmt, kib(c.size_bytes), f"{c.max_abs_logit_diff:.2g}", f"{c.perplexity:.2f}",
                  f"{c.pytorch_perplexity:.2f}", "yes" if c.tokenizer_round_trip else "NO")
                 for fmt, c in checks.items())
    table = MetricsTable(("format", "size", "max |Δlogit|", "perplexity", "PyTorch perplexity", "same token ids"),
                         rows)
    out.print(rich_table(table, f"GGUF export -> {dest} (read back with transformers, held-out sequences)",
                         out.width))
    out.print(f"wrote {', '.join(c.file for c in checks.values())} and {gguf.REPORT_FILE} in {dest}")


@app.command("export", epilog=examples(
    "kd export", "kd export --version 2", "kd export --version 2 --out edge/", "kd export --gguf"),
    help="Export the student to ONNX and int8 ONNX, check both against PyTorch on the test set, time them "
         "and attach the results to the model version (what the `export` stage runs). With --gguf: GGUF "
         "files for llama.cpp (f16 and q8_0) instead, each read back and compared with PyTorch.")
def export_cmd(
    version: Annotated[int | None, typer.Option("--version", "-v", help="export this registered version "
                                                "instead of the current student", min=1)] = None,
    dest: Annotated[Path | None, typer.Option("--out", "-o", help="output folder (default: paths.onnx, or "
                                              "paths.onnx-vN for a version; with --gguf its sibling gguf)")] = None,
    gguf: Annotated[bool, typer.Option("--gguf", help="write the language-model student as GGUF files "
                                       "(f16, q8_0) checked against PyTorch; not the export stage")] = False,
) -> None:
    if gguf:
        export_gguf(project_root(), version, dest)
    else:
        export(project_root(), version, dest)
