"""Reliability fixtures: byte snapshots of artifacts, and `tally`, where a test records the damage it
measured (bytes lost, models wrongly registered) for the figure counted in tests/tally.py."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest

from tests.tally import LOST, REGISTERED

Snapshot = dict[str, tuple[str, int]]  # path -> (sha256, size)


class Damage:
    """What a test measured, recorded on its report (not in this process) so the figure can count it."""

    def __init__(self, record: Callable[[str, object], None]) -> None:
        self._record = record

    def wrongly_registered(self, versions: int) -> None:
        self._record(REGISTERED, max(versions, 0))

    def lost(self, nbytes: int) -> None:
        self._record(LOST, nbytes)


def snapshot(root: Path, rels: Iterable[str]) -> Snapshot:
    """Hash and size of every file under the given paths (files or directories), keyed by relative path."""
    out: Snapshot = {}
    for rel in rels:
        p = root / rel
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file():
                out[str(f.relative_to(root))] = (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_size)
    return out


def lost_bytes(before: Snapshot, after: Snapshot) -> int:
    """Bytes of `before` that are not in `after` with the same content."""
    return sum(size for path, (sha, size) in before.items() if after.get(path, ("", 0))[0] != sha)


@pytest.fixture
def tally(record_property: Callable[[str, object], None]) -> Damage:
    return Damage(record_property)


