"""`kd`: the command line. Wiring and presentation only; the work happens in kd_core.stages.

User mistakes (UserError) print one line on stderr and exit 1, never a traceback. Prefect is
imported lazily, inside the commands that orchestrate, so `kd stage` stays light.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from kd_core import commands
from kd_core.config import load_params, set_params
from kd_core.errors import UserError
from kd_core.stages import STAGES

app = typer.Typer(help="Knowledge-distillation pipeline: validated data, cached teacher logits, "
                       "students promoted by policy.", no_args_is_help=True, add_completion=False,
                  epilog=commands.examples("kd run   (the whole DAG; then open reports/model_card.html)",
                                           "kd status", "kd compare", "kd predict new_rows.parquet"))
cache_app = typer.Typer(help="Inspect the soft-label cache.", no_args_is_help=True,
                        epilog=commands.examples("kd cache verify artifacts/logits", "kd cache ls"))
app.add_typer(cache_app, name="cache")
out = Console()


def _root() -> Path:
    """The project: the working directory or the nearest parent with dvc.yaml and params.yaml, like
    git and dvc, so `kd predict scored.parquet` works from a subfolder too."""
    cwd = Path.cwd()
    for root in (cwd, *cwd.parents):
        if (root / "dvc.yaml").exists() and (root / "params.yaml").exists():
            return root
    raise UserError(f"{cwd} is not a kd project (no dvc.yaml / params.yaml here or above; "
                    "hint: cd to the project, or `git clone` one)")


@app.command(epilog=commands.examples("kd stage prepare", "kd stage train_student",
                                     "dvc repro   (runs every stale stage this way, in DAG order)"))
def stage(name: Annotated[str, typer.Argument(help=f"one of: {', '.join(STAGES)}")]) -> None:
    """Run one DAG stage in this project: what dvc.yaml calls, with progress bars on a terminal."""
    if name not in STAGES:
        raise UserError(f"unknown stage {name!r}; stages are {', '.join(STAGES)}")
    root = _root()
    params = load_params(root)
    module = importlib.import_module(f"kd_core.stages.{name}")
    with commands.progress_bars():  # rows/s and ETA for caching and training, on a terminal
        result = module.run(params, root)
    print(f"{name}: {result.summary()}")


@app.command(epilog=commands.examples("kd run", "kd run --set distill.temperature=2 --set train.epochs=60",
                                     "kd run -S data.source=parquet -S data.train=data/raw/train.parquet "
                                     "-S data.test=data/raw/test.parquet"))
def run(
    set_: Annotated[list[str] | None, typer.Option(
        "--set", "-S", help="edit params.yaml before running, e.g. --set distill.temperature=2")] = None,
) -> None:
    """Run the whole DAG as a Prefect flow (DVC skips what is up to date); --set edits params.yaml first."""
    root = _root()
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
    table = Table(title="teacher / baseline / student (test set)")
    for col in ("model", "accuracy", "params", "MACs", "size (KiB)", "latency p50 (ms)", "ECE"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for role in ("teacher", "baseline", "student"):
        m = ev[role]
        table.add_row(role, f"{m['accuracy']:.3f}", f"{m['params']:,}", f"{m['macs']:,}",
                      f"{m['size_bytes'] / 1024:.1f}", f"{m['latency_ms_p50']:.3f}", f"{m['ece']:.3f}")
    out.print(table)
    reg_path = metrics / "register.json"
    if reg_path.exists():
        reg = json.loads(reg_path.read_text())
        out.print(f"promotion: [bold]{reg['decision']}[/bold] — {reg['model_name']} "
                  f"version {reg['version']} aliases {reg['aliases']}")
        for reason in reg["reasons"]:
            out.print(f"  {reason}")


@cache_app.command("verify", epilog=commands.examples("kd cache verify artifacts/logits"))
def cache_verify(path: Annotated[Path, typer.Argument(help="cache directory, e.g. artifacts/logits")]) -> None:
    """Check a cache's checksums, row coverage, shapes, dtypes and finite values."""
    from kd_core.cache import read_manifest, verify_cache

    problems = verify_cache(path)
    if problems:
        raise UserError(f"{path}: {len(problems)} problem(s): " + "; ".join(problems))
    m = read_manifest(path)
    print(f"{path}: ok: {m['rows']} rows × {m['classes']} classes, {len(m['shards'])} shard(s), "
          f"key {m['key'][:12]}")


def _current_keys(root: Path) -> set[str]:
    """The keys of the caches the current params use (one per teacher)."""
    from kd_core.cache import read_manifest

    keys = set()
    for d in load_params(root).logit_dirs():
        with contextlib.suppress(UserError):
            keys.add(read_manifest(root / d)["key"])
    return keys


@cache_app.command("ls", epilog=commands.examples("kd cache ls"))
def cache_ls() -> None:
    """List the caches in the content-addressed store (.kd/cache): current, complete or resumable."""
    from kd_core.cache import list_store

    root = _root()
    current = _current_keys(root)
    table = Table(title=f"logit caches in {load_params(root).paths.work}/cache")
    for col in ("key", "state", "rows", "MiB", "teacher"):
        table.add_column(col)
    for c in list_store(root / load_params(root).paths.work):
        state = "current" if c.key in current else ("complete" if c.complete else "partial (resumable)")
        table.add_row(c.key[:12], state, str(c.rows or "?"), f"{c.bytes / 2**20:.1f}",
                      (c.teacher_fingerprint or "?")[:12])
    out.print(table)


@cache_app.command("gc", epilog=commands.examples("kd cache gc --dry-run", "kd cache gc --keep 1"))
def cache_gc(
    keep: Annotated[int, typer.Option(help="also keep this many most recent caches")] = 0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only list what would be removed")] = False,
) -> None:
    """Delete stored caches other than the current one (and the --keep most recent)."""
    from kd_core.cache import gc_store, list_store

    root = _root()
    work = root / load_params(root).paths.work
    current = _current_keys(root)
    others = [c.key for c in list_store(work) if c.key not in current]
    protected = set(others[:keep]) | current
    if dry_run:
        doomed, busy = [c for c in list_store(work) if c.key not in protected], []
    else:
        doomed, busy = gc_store(work, protected)
    verb = "would remove" if dry_run else "removed"
    print(f"{verb} {len(doomed)} cache(s), {sum(c.bytes for c in doomed) / 2**20:.1f} MiB: "
          + (", ".join(c.key[:12] for c in doomed) or "nothing")
          + (f"; kept {len(busy)} being built: " + ", ".join(c.key[:12] for c in busy) if busy else ""))


@app.command(epilog=commands.examples('kd promote 3 --reason "needed for the partner demo"'))
def promote(
    version: Annotated[int, typer.Argument(help="the model version to make champion")],
    reason: Annotated[str, typer.Option("--reason", help="why (goes into the audit trail)")],
    by: Annotated[str | None, typer.Option(help="who (default: user@host)")] = None,
) -> None:
    """Make VERSION the champion by hand, overriding the promotion policy; audited in the registry."""
    root = _root()
    from kd_core import provenance, registry  # lazy: mlflow loads only for the commands that need it

    print(registry.promote(root, load_params(root), version, reason, by or provenance.current_user()).summary())


@app.command(epilog=commands.examples('kd rollback --reason "canary error rate"'))
def rollback(
    reason: Annotated[str, typer.Option("--reason", help="why (goes into the audit trail)")],
    by: Annotated[str | None, typer.Option(help="who (default: user@host)")] = None,
) -> None:
    """Move champion back to the previous champion; audited in the registry."""
    root = _root()
    from kd_core import provenance, registry

    print(registry.rollback(root, load_params(root), reason, by or provenance.current_user()).summary())


@app.command(epilog=commands.examples("kd serve"))
def serve() -> None:
    """Run the DAG on schedule.cron from this machine (Prefect serve); Ctrl-C stops."""
    root = _root()
    params = load_params(root)
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.schedule import serve_distill  # lazy: Prefect loads only for orchestration

    serve_distill(root, params)


commands.add_to(app, _root)  # kd status, kd compare, kd predict, kd export


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 1."""
    try:
        app(standalone_mode=False)
    except UserError as exc:
        print(f"kd: error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 1))
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
