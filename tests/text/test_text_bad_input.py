"""Bad text input against a text project whose teacher and logit cache are already built. Every case
must: exit != 0 with exactly one `kd: error:` line naming the problem, no traceback, no model version
registered, no earlier artifact changed. Data and teacher problems must stop the DAG before the teacher
trains: each runs `kd stage` for prepare, validate and teacher in order and must fail before the
teacher. A student that cannot read the teacher's tokens is refused when train_student builds it.

Counted in the suite's reliability figure (`bad_input` marker, tests/tally.py).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from tests.conftest import kd
from tests.reliability.conftest import Damage, check_refused
from tests.text.conftest import ENCODER, LABEL, TEXT, Tables, other_tokenizer, student_config, text_project

pytestmark = pytest.mark.slow
UP_TO_TEACHER = ("prepare", "validate", "teacher")  # the case must fail before the last one
STUDENT = ("train_student",)
UPSTREAM = ["data/prepared", "reports/validation"]  # a case's prepare/validate rewrites them: restored after
GUARDED = ["artifacts/teacher", "artifacts/logits"]  # must come through every case byte for byte
SCRATCH = ["data/raw/encoder-no-tokenizer", "data/raw/student-config"]  # what cases add, removed after each


@dataclass
class Prepared:
    """The project after prepare, validate, teacher and cache_logits, with its good params and tables."""

    root: Path
    params: str
    tables: Tables

    def set_params(self, change: Callable[[dict], None]) -> None:
        raw = yaml.safe_load(self.params)
        change(raw)
        (self.root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    def restore(self) -> None:
        (self.root / "params.yaml").write_text(self.params)
        for name in ("train", "test"):
            shutil.copy2(getattr(self.tables, name), self.root / f"data/raw/{name}.parquet")
        for rel in SCRATCH:
            shutil.rmtree(self.root / rel, ignore_errors=True)
        for rel in UPSTREAM:
            shutil.rmtree(self.root / rel, ignore_errors=True)
            shutil.copytree(self.root.parent / "good" / rel, self.root / rel)

    def versions(self) -> int:
        return len(MlflowClient().search_model_versions("name='kd-student'"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, tiny_encoder: Path,
             text_tables: Tables) -> Iterator[Prepared]:
    tmp = tmp_path_factory.mktemp("text-bad-input")
    with text_project(tmp, tiny_encoder, text_tables) as root:
        for stage in ("prepare", "validate", "teacher", "cache_logits"):
            res = kd(root, "stage", stage)
            assert res.returncode == 0, f"{stage}: {res.stderr[-3000:]}"
        for rel in UPSTREAM:
            shutil.copytree(root / rel, tmp / "good" / rel)
        yield Prepared(root, (root / "params.yaml").read_text(), text_tables)


@pytest.fixture
def tally(record_property: Callable[[str, object], None]) -> Damage:
    """The reliability suite's damage record (tests/reliability/conftest.py), for this module's cases."""
    return Damage(record_property)


# --- the cases ------------------------------------------------------------------------------------

def _train(change: Callable[[pd.DataFrame], pd.DataFrame]) -> Callable[[Prepared], None]:
    def apply(p: Prepared) -> None:
        change(pd.read_parquet(p.tables.train)).to_parquet(p.root / "data/raw/train.parquet", index=False)
    return apply


def _texts(rows: list[int], value: object) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def change(df: pd.DataFrame) -> pd.DataFrame:
        df[TEXT] = df[TEXT].astype(object)
        df.loc[rows, TEXT] = value
        return df
    return change


def _longer_than_positions(p: Prepared) -> None:
    """data.max_length 256 for an encoder of 128 positions, and one document of ~250 tokens that needs them."""
    def add_long(df: pd.DataFrame) -> pd.DataFrame:
        df.loc[len(df)] = [" ".join(df[TEXT].iloc[:25]), df[LABEL].iloc[0]]
        return df
    _train(add_long)(p)
    p.set_params(lambda raw: raw["data"].update(max_length=256))


def _encoder_without_tokenizer(p: Prepared) -> None:
    folder = p.root / "data/raw/encoder-no-tokenizer"
    shutil.copytree(p.root / ENCODER, folder, ignore=shutil.ignore_patterns("tokenizer.json"))
    p.set_params(lambda raw: raw["teacher"].update(init="data/raw/encoder-no-tokenizer"))


def _student_dir(vocab_delta: int = 0, own_tokenizer: bool = False, positions: int = 128) -> Callable[[Prepared], None]:
    """A Hugging Face config directory as student.arch: another vocabulary size, another tokenizer.json, or
    fewer positions than data.max_length (32)."""
    def apply(p: Prepared) -> None:
        vocab = json.loads((p.root / ENCODER / "config.json").read_text())["vocab_size"]
        folder = student_config(p.root / "data/raw/student-config", vocab + vocab_delta, positions)
        if own_tokenizer:
            other_tokenizer(folder / "tokenizer.json")
        p.set_params(lambda raw: raw.update(student={"arch": "data/raw/student-config", "options": {}}))
    return apply


CASES: dict[str, tuple[Callable[[Prepared], None], list[str], tuple[str, ...]]] = {
    # case: (break it, words the error line must hold, stages to run in order)
    "text: empty documents": (_train(_texts([3, 8, 13], "")), ["text", "3 empty or blank"], UP_TO_TEACHER),
    "text: blank documents": (_train(_texts([5], " \n\t ")), ["text", "1 empty or blank"], UP_TO_TEACHER),
    "text: null documents": (_train(_texts([4, 9], None)), ["text", "2 null"], UP_TO_TEACHER),
    "text: integer text column": (_train(lambda d: d.assign(**{TEXT: range(len(d))})),
                                  ["train.parquet", "'text'", "not text"], UP_TO_TEACHER),
    "text: encoder without tokenizer.json": (_encoder_without_tokenizer,
                                             ["teacher.init", "encoder-no-tokenizer", "tokenizer.json"],
                                             UP_TO_TEACHER),
    "text: max_length beyond the encoder's positions": (_longer_than_positions, ["data.max_length", "128"],
                                                        UP_TO_TEACHER),
    "text: student with another tokenizer": (_student_dir(own_tokenizer=True),
                                             ["student-config/tokenizer.json", "differs"], STUDENT),
    "text: student with another vocabulary": (_student_dir(vocab_delta=7), ["student-config", "vocabulary", "teacher"],
                                              STUDENT),
    "text: student with fewer positions than max_length": (_student_dir(positions=8),
                                                           ["student-config", "max_length", "8"], STUDENT),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", list(CASES))
def test_bad_text_input_is_one_line_before_compute(prepared: Prepared, case: str, tally: Damage,
                                                  record_property: Callable[[str, object], None]) -> None:
    break_it, needles, stages = CASES[case]
    check_refused(prepared, break_it, needles, stages, GUARDED, tally, record_property)
