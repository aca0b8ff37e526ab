"""Bad input, through the bring-your-own parquet path and params.yaml, against a project that already
has a good run and a champion. Every case must: exit != 0, print exactly one `kd: error:` line that
names the problem, show no traceback, register no model version, leave the champion alias alone and
leave every earlier artifact byte-for-byte as it was.

Two cases go through the whole `kd run` (the Prefect flow, which restores the failed stage's last good
outputs); the rest run `kd stage NAME` for the stages up to the one they must fail in, which is what
the flow and `dvc repro` run, without a Prefect start-up per case.
"""

from __future__ import annotations

import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient

from tests.conftest import BIN, ROOT, TINY, deep_update, git, run_cmd
from tests.reliability.conftest import Damage, Snapshot, lost_bytes, snapshot

pytestmark = pytest.mark.slow
LABELS = ["cat", "dog", "eel"]
UPSTREAM = ["data/prepared", "reports/validation"]  # restored between cases run stage by stage
GUARDED = ["artifacts/teacher", "artifacts/student", "artifacts/baseline", "artifacts/logits", "metrics/eval.json"]
OUTCOMES: dict[str, str] = {}  # case -> the error line, summarised at the end of the module


def table(n: int, seed: int, width: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(0).normal(scale=2.5, size=(len(LABELS), width))
    y = rng.choice(len(LABELS), n)
    df = pd.DataFrame(rng.normal(size=(n, width)) + centers[y], columns=[f"f{i}" for i in range(width)])
    df["species"] = [LABELS[i] for i in y]
    return df


GOOD_TRAIN, GOOD_TEST = table(300, 1), table(120, 2)


class Project:
    """A project with one good `kd run` behind it; each case breaks it, runs, and restores it."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root, self.env = root, env
        self.good_params = (root / "params.yaml").read_text()

    def params(self, overrides: dict) -> None:
        raw = yaml.safe_load(self.good_params)
        (self.root / "params.yaml").write_text(yaml.safe_dump(deep_update(raw, overrides), sort_keys=False))

    def restore(self) -> None:
        (self.root / "params.yaml").write_text(self.good_params)
        GOOD_TRAIN.to_parquet(self.root / "data/raw/train.parquet")
        GOOD_TEST.to_parquet(self.root / "data/raw/test.parquet")
        for rel in UPSTREAM:  # a case's own `kd stage prepare` rewrote them from its bad tables
            saved = self.root.parent / "good" / rel
            if saved.exists():
                shutil.rmtree(self.root / rel, ignore_errors=True)
                shutil.copytree(saved, self.root / rel)

    def keep_good_upstream(self) -> None:
        for rel in UPSTREAM:
            shutil.copytree(self.root / rel, self.root.parent / "good" / rel)

    def kd_stages(self, stages: tuple[str, ...]):
        """`kd stage` for each of `stages` in order; every one before the last must succeed."""
        for stage in stages:
            res = self._kd("stage", stage)
            if res.returncode != 0 or stage == stages[-1]:
                assert stage == stages[-1], f"{stage} failed before the stage under test: {res.stderr[-2000:]}"
                return res

    def kd_run(self):
        return self._kd("run")

    def _kd(self, *args: str):
        old = dict(os.environ)
        os.environ.update(self.env)
        try:
            return run_cmd(self.root, str(BIN / "kd"), *args)
        finally:
            os.environ.clear()
            os.environ.update(old)

    def snapshot(self) -> Snapshot:
        return snapshot(self.root, GUARDED)

    def registry(self) -> tuple[int, int]:
        client = MlflowClient(tracking_uri=self.env["MLFLOW_TRACKING_URI"])
        versions = client.search_model_versions("name='kd-student'")
        return len(versions), int(client.get_model_version_by_alias("kd-student", "champion").version)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Project:
    tmp = tmp_path_factory.mktemp("badinput")
    root = tmp / "proj"
    for f in ["dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", ".gitignore", "data/raw/.gitkeep",
              "pyproject.toml"]:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, root / f)
    for d in ("kd_core", "flows"):
        shutil.copytree(ROOT / d, root / d, ignore=shutil.ignore_patterns("__pycache__"))
    raw = deep_update(yaml.safe_load((root / "params.yaml").read_text()), TINY)
    raw["data"].update(source="parquet", train="data/raw/train.parquet", test="data/raw/test.parquet",
                       label_column="species")
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "PREFECT_HOME": str(tmp / "prefect"),
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@kd.invalid",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@kd.invalid"}
    project = Project(root, env)
    project.restore()
    old = dict(os.environ)
    os.environ.update(env)
    try:
        git(root, "init", "-q")
        git(root, "add", "-A")
        git(root, "commit", "-qm", "good project")
    finally:
        os.environ.clear()
        os.environ.update(old)
    res = project.kd_run()
    assert res.returncode == 0, res.stdout + res.stderr
    assert project.registry() == (1, 1)
    project.keep_good_upstream()
    yield project
    summary = "\n".join(f"  {case}: {line}" for case, line in OUTCOMES.items())
    (tmp / "outcomes.txt").write_text(summary)
    versions, _ = project.registry()
    print(f"\n{len(OUTCOMES)} of {len(CASES)} bad-input classes rejected, {versions - 1} models wrongly "
          f"registered, {len(CASES) - len(OUTCOMES)} cases lost or changed bytes:\n{summary}")


def _write(name: str, payload: bytes | Callable[[Path], None]) -> Callable[[Project], None]:
    def apply(p: Project) -> None:
        target = p.root / "data/raw" / name
        payload(target) if callable(payload) else target.write_bytes(payload)
    return apply


def _frames(train: Callable[[pd.DataFrame], pd.DataFrame] = lambda d: d,
            test: Callable[[pd.DataFrame], pd.DataFrame] = lambda d: d) -> Callable[[Project], None]:
    def apply(p: Project) -> None:
        train(GOOD_TRAIN.copy()).to_parquet(p.root / "data/raw/train.parquet")
        test(GOOD_TEST.copy()).to_parquet(p.root / "data/raw/test.parquet")
    return apply


def _params(overrides: dict) -> Callable[[Project], None]:
    return lambda p: p.params(overrides)


def _set(df: pd.DataFrame, rows: list[int], col: str, value) -> pd.DataFrame:
    df.loc[rows, col] = value
    return df


class Exploit:
    """A pickle that would create a file if it were ever unpickled without weights_only."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious_checkpoint(p: Project) -> None:
    with (p.root / "data/raw/teacher.pt").open("wb") as f:
        pickle.dump({"net.0.weight": Exploit(str(p.root / "PWNED"))}, f)
    p.params({"teacher": {"source": "data/raw/teacher.pt"}})


def _mismatched_checkpoint(p: Project) -> None:
    torch.save({"0.weight": torch.zeros(3, 3)}, p.root / "data/raw/teacher.pt")  # an MLP's, not a CNN's
    p.params({"teacher": {"source": "data/raw/teacher.pt"}})


PREPARE, VALIDATE = ("prepare",), ("prepare", "validate")
KD_RUN = ()  # the whole flow
CASES = {  # case: (break it, words the error line must hold, the stages to run: the last one must fail)
    "missing file": (lambda p: (p.root / "data/raw/train.parquet").unlink(), ["train.parquet", "not found"],
                     PREPARE),
    "empty file": (_write("train.parquet", b""), ["train.parquet", "empty"], PREPARE),
    "corrupt parquet": (_write("test.parquet", b"PAR1" + b"\x00" * 200), ["test.parquet", "parquet"], PREPARE),
    "missing label column": (_frames(train=lambda d: d.drop(columns=["species"])), ["species", "not found"],
                             PREPARE),
    "label outside classes": (_frames(test=lambda d: _set(d, [0, 1, 2], "species", "zebra")),
                              ["test.parquet", "species", "3", "zebra"], KD_RUN),
    "null labels": (_frames(train=lambda d: _set(d, [4, 9], "species", None)), ["species", "2 null"], VALIDATE),
    "NaN feature": (_frames(train=lambda d: _set(d, [5], "f3", np.nan)), ["f3", "1 null"], VALIDATE),
    "+Inf feature": (_frames(train=lambda d: _set(d, [5, 6], "f1", np.inf)), ["f1", "2 infinite"], VALIDATE),
    "-Inf feature": (_frames(test=lambda d: _set(d, [7], "f0", -np.inf)), ["test.parquet", "f0", "infinite"],
                     VALIDATE),
    "non-numeric feature": (_frames(train=lambda d: d.assign(f2=d["f2"].astype(str))), ["f2", "not numeric"],
                            PREPARE),
    "train/test schema mismatch": (_frames(test=lambda d: d.rename(columns={"f4": "g4"})),
                                   ["test.parquet", "f4"], PREPARE),
    "train lacks a test column": (_frames(train=lambda d: d.drop(columns=["f5"])),
                                  ["test.parquet", "f5", "train.parquet"], PREPARE),
    "class absent from train": (_frames(train=lambda d: d[d.species != "eel"]), ["test.parquet", "eel"], VALIDATE),
    "too few rows": (_frames(train=lambda d: d.groupby("species").head(2)), ["min_rows_per_class"], VALIDATE),
    "duplicated rows": (_frames(train=lambda d: pd.concat([d, d.head(100)], ignore_index=True)),
                        ["max_duplicate_frac"], VALIDATE),
    "params unknown key": (_params({"distill": {"temprature": 2}}), ["distill.temprature", "unknown key"], PREPARE),
    "params wrong type": (_params({"train": {"epochs": "ten"}}), ["train.epochs"], PREPARE),
    "params T <= 0": (_params({"distill": {"temperature": 0}}), ["distill.temperature"], PREPARE),
    "params alpha > 1": (_params({"distill": {"alpha": 1.5}}), ["distill.alpha"], PREPARE),
    "params top_k > classes": (_params({"cache": {"top_k": 5}}), ["top_k", "3"], ("cache_logits",)),
    "teacher checkpoint mismatch": (_mismatched_checkpoint, ["teacher.pt", "does not match"], ("teacher",)),
    "malicious pickle checkpoint": (_malicious_checkpoint, ["teacher.pt", "refused"], KD_RUN),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_rejected_and_loses_nothing(good: Project, case: str, tally: Damage,
                                                 record_property: Callable[[str, object], None]) -> None:
    break_it, needles, stages = CASES[case]
    before_files, before_registry = good.snapshot(), good.registry()
    try:
        break_it(good)
        res = good.kd_stages(stages) if stages else good.kd_run()
    finally:
        good.restore()
    after_files, after_registry = good.snapshot(), good.registry()
    tally.lost(lost_bytes(before_files, after_files))  # measured before the asserts: damage always shows
    tally.wrongly_registered(after_registry[0] - before_registry[0])
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("kd: error:")]
    assert res.returncode != 0, res.stdout[-2000:]
    assert len(errors) == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert after_registry == before_registry  # no version registered, champion unchanged
    assert after_files == before_files  # every earlier artifact byte-for-byte intact
    assert not (good.root / "PWNED").exists()
    OUTCOMES[case] = errors[0].replace(str(good.root) + "/", "")  # counted only when every check passed
    record_property("outcome", OUTCOMES[case])

