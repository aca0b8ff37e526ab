"""Atomic writers: unique temporary names, the old output intact until the new one is complete."""

from __future__ import annotations

from pathlib import Path

import pytest

from kd_core.fs import atomic_dir, atomic_write_text


def test_a_failed_block_keeps_the_previous_directory(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("good")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("crash")
    assert (out / "a").read_text() == "good" and [p.name for p in tmp_path.iterdir()] == ["out"]


def test_two_writers_of_one_directory_never_share_a_temporary_name(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_dir(out) as first, atomic_dir(out) as second:  # e.g. two `kd stage` processes at once
        assert first != second
        (first / "who").write_text("first")
        (second / "who").write_text("second")
    assert (out / "who").read_text() == "first"  # the last to finish wins, whole
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_atomic_write_text_uses_unique_temporaries(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real = __import__("os").replace

    def spy(src, dst):
        seen.append(Path(src).name)
        real(src, dst)

    monkeypatch.setattr("kd_core.fs.os.replace", spy)
    atomic_write_text(tmp_path / "m.json", "1")
    atomic_write_text(tmp_path / "m.json", "2")
    assert (tmp_path / "m.json").read_text() == "2" and len(set(seen)) == 2
