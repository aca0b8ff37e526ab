"""The stdlib corpus: data.max_tokens keeps a seeded sample of the modules, not an alphabetical prefix, and
the data records the Python whose standard library it read."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from kd_core.config import DataParams
from kd_core.tasks.lm import data as lm_data
from kd_core.tasks.lm.data import LMInfo


@pytest.fixture(scope="module")
def stdlib_docs() -> list[tuple[str, str]]:
    return lm_data.stdlib_documents()


def split(docs: list[tuple[str, str]], seed: int, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(lm_data, "stdlib_documents", lambda: docs)
    return lm_data.read_documents(DataParams(source="stdlib", test_fraction=0.2, seed=seed), Path("unused"))


def test_max_tokens_keeps_a_sample_of_the_modules(stdlib_docs: list[tuple[str, str]],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    train, test = split(stdlib_docs, 42, monkeypatch)
    names = [n for n, _ in train]
    assert names != sorted(names)
    # what packing keeps under a cap is the start of this order: a spread over the alphabet, not a..b
    ids = [[1] * 50 for _ in train]
    frame = lm_data.packed_frame(train, ids, 16, 0, max_tokens=16 * 60)
    kept = sorted(set(frame[lm_data.DOC]))
    everything = sorted(n for n, _ in stdlib_docs)
    positions = np.array([everything.index(n) for n in kept]) / len(everything)
    assert positions.min() < 0.2 and positions.max() > 0.8  # from the whole corpus


def test_the_sample_is_seeded_stable_and_leaves_the_split_alone(stdlib_docs: list[tuple[str, str]],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    train, test = split(stdlib_docs, 42, monkeypatch)
    assert split(stdlib_docs, 42, monkeypatch) == (train, test)  # the same in every run
    other_train, other_test = split(stdlib_docs, 7, monkeypatch)
    assert other_train != train and sorted(other_train) == sorted(train)  # another seed, another order ...
    assert sorted(other_test) == sorted(test)  # ... of the same split: held out by name, not by seed
    assert {n for n, _ in test} == {n for n, _ in stdlib_docs if lm_data._held_out(n, 0.2)}
    fewer = stdlib_docs[::2]  # a Python with other modules: those that remain keep their order
    fewer_train, _ = split(fewer, 42, monkeypatch)
    remaining = set(fewer)
    assert fewer_train == [d for d in train if d in remaining]


def test_the_data_records_the_python_that_read_the_stdlib() -> None:
    info = LMInfo(16, 0, 384, "0" * 64, 100, 100).to_json()
    assert info["python"] == f"{sys.version_info.major}.{sys.version_info.minor}" == lm_data.python_version()
    assert "Python major.minor" in (lm_data.stdlib_documents.__doc__ or "")
