"""The content-addressed cache store under `<paths.work>/cache/`: list, collect garbage, lock.

A build holds the lock of its key for its whole run; `gc_store` takes each victim's lock without
waiting and skips (and reports) a cache whose lock is held, so it never deletes a cache being built;
`list_store` probes each lock the same way to say which caches are being built.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import filelock

from kd_core.cache.format import STORE, read_manifest
from kd_core.errors import UserError


@dataclass(frozen=True)
class StoredCache:
    key: str
    path: Path
    complete: bool
    rows: int | None
    bytes: int
    modified: float  # the store directory's mtime
    teacher_fingerprint: str | None
    building: bool = False  # a build holds its key's lock right now


def list_store(work: Path) -> list[StoredCache]:
    """Every cache in the store, complete or interrupted, newest first."""
    out = []
    for d in sorted((work / STORE).glob("*")):
        if not d.is_dir():
            continue
        size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
        try:
            m = read_manifest(d)
        except UserError:
            m = None
        out.append(StoredCache(d.name, d, m is not None, m["rows"] if m is not None else None, size,
                               d.stat().st_mtime, m.get("teacher_fingerprint") if m is not None else None,
                               _held(work, d.name)))
    return sorted(out, key=lambda c: (c.modified, c.key), reverse=True)


def _lock_file(work: Path, key: str) -> Path:
    """Locks live beside the store, not in it: the store holds one directory per key and nothing else.

    A lock file is never deleted (it is empty): a build waiting on it holds it open, and unlinking it
    would let the next locker create a second file under the same name, so two would hold "the" lock.
    """
    return work / f"{STORE}.locks" / f"{key}.lock"


def _held(work: Path, key: str) -> bool:
    """Whether a build holds the lock of `key` now (probed without waiting)."""
    try:
        with key_lock(work, key, timeout=0):
            return False
    except filelock.Timeout:
        return True


@contextmanager
def key_lock(work: Path, key: str, timeout: float = -1) -> Iterator[None]:
    """Hold the store lock of `key` (a build holds it throughout; another build of the same key waits)."""
    path = _lock_file(work, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(path, timeout=timeout):
        yield


def gc_store(work: Path, keep: set[str]) -> tuple[list[StoredCache], list[StoredCache]]:
    """Delete every stored cache whose key is not in `keep` and that no build holds.

    Returns (removed, in use): a cache whose lock is held is being built right now and is kept.
    """
    removed, busy = [], []
    for c in list_store(work):
        if c.key in keep:
            continue
        try:
            with key_lock(work, c.key, timeout=0):
                shutil.rmtree(c.path)
            removed.append(c)
        except filelock.Timeout:
            busy.append(c)
    return removed, busy
