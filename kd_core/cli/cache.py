"""`kd cache verify | ls | gc`: check a cache, list the store, collect what no run uses."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from kd_core.cli.app import cache_app, examples, out, project_root
from kd_core.config import load_params
from kd_core.errors import UserError


@cache_app.command("verify", epilog=examples("kd cache verify artifacts/logits"))
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


@cache_app.command("ls", epilog=examples("kd cache ls"))
def cache_ls() -> None:
    """List the caches in the content-addressed store (.kd/cache): current, complete or resumable."""
    from kd_core.cache import list_store

    root = project_root()
    current = _current_keys(root)
    table = Table(title=f"logit caches in {load_params(root).paths.work}/cache")
    for col in ("key", "state", "rows", "MiB", "teacher"):
        table.add_column(col)
    for c in list_store(root / load_params(root).paths.work):
        state = ("building" if c.building else "current" if c.key in current
                 else "complete" if c.complete else "partial (resumable)")
        table.add_row(c.key[:12], state, str(c.rows or "?"), f"{c.bytes / 2**20:.1f}",
                      (c.teacher_fingerprint or "?")[:12])
    out.print(table)


@cache_app.command("gc", epilog=examples("kd cache gc --dry-run", "kd cache gc --keep 1"))
def cache_gc(
    keep: Annotated[int, typer.Option(help="also keep this many most recent caches")] = 0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only list what would be removed")] = False,
) -> None:
    """Delete stored caches other than the current one (and the --keep most recent)."""
    from kd_core.cache import gc_store, list_store

    root = project_root()
    work = root / load_params(root).paths.work
    current = _current_keys(root)
    others = [c.key for c in list_store(work) if c.key not in current]
    protected = set(others[:keep]) | current
    if dry_run:
        candidates = [c for c in list_store(work) if c.key not in protected]
        doomed, busy = [c for c in candidates if not c.building], [c for c in candidates if c.building]
    else:
        doomed, busy = gc_store(work, protected)
    verb = "would remove" if dry_run else "removed"
    print(f"{verb} {len(doomed)} cache(s), {sum(c.bytes for c in doomed) / 2**20:.1f} MiB: "
          + (", ".join(c.key[:12] for c in doomed) or "nothing")
          + (f"; kept {len(busy)} being built: " + ", ".join(c.key[:12] for c in busy) if busy else ""))
