"""Reliability fixtures: byte snapshots of artifacts, and `tally`, where a test records the damage it
measured (bytes lost, models wrongly registered) for the figure counted in tests/tally.py."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

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




class Breakable(Protocol):
    """A module's built project that bad-input cases break and restore (tests/<task>/test_*_bad_input.py)."""

    root: Path

    def restore(self) -> None: ...

    def versions(self) -> int: ...


def first_failure(root: Path, stages: tuple[str, ...], kd: Callable | None = None):  # -> (stage, CompletedProcess)
    """`kd stage` for each stage in order, stopping at the first that fails (or after the last); `kd` runs
    one command (tests.conftest.kd, a subprocess, unless given)."""
    from tests.conftest import kd as in_subprocess

    for stage in stages:
        res = (kd or in_subprocess)(root, "stage", stage)
        if res.returncode != 0:
            break
    return stage, res


def check_refused(project: Breakable, break_it: Callable, needles: list[str], stages: tuple[str, ...],
                  guarded: list[str], tally: Damage, record_property: Callable[[str, object], None],
                  kd: Callable | None = None) -> None:
    """Break the project, run `stages` until one fails, restore it; the failure must be one `kd: error:`
    line holding every needle, before the teacher stage, with no traceback, nothing registered and the
    `guarded` artifacts byte for byte as they were. The damage is recorded before any assert. `kd` runs
    the stages (a subprocess each unless given, see first_failure)."""
    before_files, before_versions = snapshot(project.root, guarded), project.versions()
    try:
        break_it(project)
        stage, res = first_failure(project.root, stages, kd)
    finally:
        project.restore()
    after_files = snapshot(project.root, guarded)
    tally.lost(lost_bytes(before_files, after_files))  # measured before the asserts: damage always shows
    tally.wrongly_registered(project.versions() - before_versions)
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("kd: error:")]
    last = [ln.strip() for ln in res.stderr.splitlines() if "Error" in ln][-2:]  # what escaped, if anything
    assert res.returncode != 0, f"every stage of {stages} passed: {res.stdout[-2000:]}"
    assert stage != "teacher", f"the bad input reached the teacher stage: {errors or last}"
    assert len(errors) == 1, f"{stage}: {len(errors)} 'kd: error:' lines; stderr ends {last}"
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert project.versions() == before_versions == 0
    assert after_files == before_files
    assert not (project.root / "artifacts/student").exists()
    record_property("outcome", errors[0].replace(str(project.root) + "/", ""))
