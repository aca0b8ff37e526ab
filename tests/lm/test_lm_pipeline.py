"""`task: lm` under `dvc repro evaluate`: a tiny random Llama teacher (tokenizer trained in the test) on
the standard-library corpus, a layer-subset student from its sparse top-k cache, and the text-only twin.
One project, built once for the module; each test reads one output against the contract."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from tokenizers import Tokenizer

from kd_core.cache import LogitCache
from kd_core.tasks.lm import data as lm_data
from kd_core.tasks.lm import models as lm_models
from tests.conftest import ALL_STAGES, BIN, ROOT, deep_update, dvc, git, kd, new_project, stages_ran, write_params
from tests.e2e.test_registry import free_port
from tests.lm.conftest import build_llama, train_tokenizer
from tests.text.conftest import project_env

pytestmark = pytest.mark.slow
TEACHER = "models/tiny-llama"
SEQ, K = 32, 16
LM = {"data": {"source": "stdlib", "seq_len": SEQ, "max_tokens": 3072, "max_test_tokens": 512,
                             "test_fraction": 0.1},
      "teacher": {"source": TEACHER}, "student": {"arch": "layers", "options": {"layers": [0, 3]}},
      "cache": {"top_k": K, "dtype": "float16", "shard_rows": 500, "batch_size": 4},
      "distill": {"temperature": 1.0, "alpha": 0.5, "search": None},
      "train": {"epochs": 2, "batch_size": 8, "lr": 0.001, "patience": None, "val_fraction": 0.1}}


def lm_project(tmp: Path, teacher: Path | None, overrides: dict | None = None) -> Path:
    """A committed project with the LM params and the teacher directory (if any) under models/."""
    proj = new_project(tmp / "proj", {})
    shutil.copy2(ROOT / "examples/lm/params.yaml", proj / "params.yaml")
    write_params(proj, deep_update(LM, overrides or {}))
    if teacher is not None:
        shutil.copytree(teacher, proj / TEACHER)
    git(proj, "init", "-q")
    git(proj, "add", "-A")
    git(proj, "commit", "-qm", "lm project")
    return proj


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Iterator[tuple[Path, str]]:
    tmp = tmp_path_factory.mktemp("lm-e2e")
    with pytest.MonkeyPatch.context() as mp:
        for var, value in project_env(tmp).items():
            mp.setenv(var, value)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        proj = lm_project(tmp, tiny_llama_dir)
        mp.chdir(proj)
        res = dvc(proj, "repro")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        yield proj, res.stdout


def read(proj: Path, rel: str) -> dict:
    return json.loads((proj / rel).read_text())


def test_repro_runs_the_whole_dag(run: tuple[Path, str]) -> None:
    assert stages_ran(run[1]) == ALL_STAGES


def test_sequences_are_packed_with_the_teachers_tokenizer(run: tuple[Path, str]) -> None:
    proj, _ = run
    info = read(proj, "data/prepared/schema.json")["text"]
    blob = (proj / TEACHER / "tokenizer.json").read_bytes()
    assert info["seq_len"] == SEQ and info["tokenizer_sha256"] == lm_models.tokenizer_sha256(blob)
    assert (proj / "data/prepared/tokenizer.json").read_bytes() == blob
    train = np.stack(pd.read_parquet(proj / "data/prepared/train.parquet")[lm_data.IDS].to_numpy())
    assert train.shape == (3072 // SEQ, SEQ + 1)
    assert (train[1:, 0] == train[:-1, -1]).all()  # consecutive sequences share one token: none lost
    docs = pd.read_parquet(proj / "data/prepared" / lm_data.DOCUMENTS)
    test_docs = pd.read_parquet(proj / "data/prepared/test.parquet")[lm_data.DOC]
    assert set(test_docs) <= set(docs[docs["split"] == "test"]["name"])  # split by document
    assert not set(docs[docs["split"] == "test"]["name"]) & set(docs[docs["split"] == "train"]["name"])


def test_cache_rows_are_token_positions_with_uint16_indices(run: tuple[Path, str]) -> None:
    """Row i·L + t holds the teacher's top-k for position t of sequence i (recomputed here), in the
    example's compact encoding (below the raw 4·K + 4 bytes per token), and `kd cache verify` passes."""
    proj, _ = run
    cache = LogitCache(proj / "artifacts/logits")
    train = np.stack(pd.read_parquet(proj / "data/prepared/train.parquet")[lm_data.IDS].to_numpy())
    assert cache.rows == len(train) * SEQ and cache.top_k == K
    assert cache.manifest["index_dtype"] == "uint16" and cache.manifest["encoding"] == "compact"
    assert cache.manifest["bytes_per_row"] < 4 * K + 4
    teacher, _ = lm_models.load(proj / "artifacts/teacher")
    i = len(train) - 3
    with torch.inference_mode():
        want = teacher(torch.from_numpy(train[i:i + 1, :-1]))[0].topk(K, dim=-1)  # (L, K)
    got = cache.take_topk(np.arange(i * SEQ, (i + 1) * SEQ))
    np.testing.assert_array_equal(got.indices[:, 0], want.indices[:, 0].numpy())  # the top token per position
    kept = np.isfinite(got.values)  # a class > 15.9 nats below its row's top joins the tail (compact)
    assert kept[:, :8].all()
    np.testing.assert_allclose(got.values[kept], want.values.numpy()[kept], atol=1 / 32 + 2e-2)  # a step + f16
    verify = kd(proj, "cache", "verify", "artifacts/logits")
    assert verify.returncode == 0 and "ok" in verify.stdout


def test_eval_json_holds_the_lm_metrics(run: tuple[Path, str]) -> None:
    proj, _ = run
    ev = read(proj, "metrics/eval.json")
    keys = {"perplexity", "kl_to_teacher", "tokens_per_s", "agreement_with_teacher", "params", "macs",
            "latency_ms_p50", "size_bytes"}
    for role in ("teacher", "student", "baseline"):
        assert keys <= set(ev[role]), (role, sorted(ev[role]))
        assert ev[role]["perplexity"] > 1 and ev[role]["tokens_per_s"] > 0 and ev[role]["macs"] > 0
    assert ev["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert ev["teacher"]["agreement_with_teacher"] == 1.0
    assert ev["student"]["params"] < ev["teacher"]["params"] and ev["student"]["macs"] < ev["teacher"]["macs"]
    assert ev["student"]["kl_to_teacher"] > 0


def test_register_decides_on_perplexity_and_the_served_model_completes_prompts(run: tuple[Path, str]) -> None:
    proj, _ = run
    reg = read(proj, "metrics/register.json")
    assert reg["version"] == 1 and "challenger" in reg["aliases"]
    assert "(teacher / student perplexity)" in reg["reasons"][0]
    assert "(baseline - student perplexity)" in reg["reasons"][1]
    served = mlflow.pyfunc.load_model("models:/kd-student/1")  # MLflow's own loading, as `models serve` does
    params = {p.name: p.default for p in served.metadata.signature.params}
    assert params == {"output": "completions", "max_new_tokens": 32}
    out = served.predict(pd.DataFrame({"text": ["Return the number of", "def"]}), params={"max_new_tokens": 5})
    assert len(out) == 2 and all(isinstance(c, str) for c in out)
    student, _ = lm_models.load(proj / "artifacts/student")
    tok = Tokenizer.from_str((proj / TEACHER / "tokenizer.json").read_text())
    ids = tok.encode("Return the number of", add_special_tokens=False).ids
    want = tok.decode([t for t in lm_models.generate(student, ids, 5) if t != 0])
    assert out[0] == want  # greedy: the served completion is the student's own


def test_export_scores_perplexity_per_runtime_and_the_card_shows_samples(run: tuple[Path, str]) -> None:
    proj, _ = run
    student = read(proj, "metrics/export.json")["student"]
    assert {"pytorch", "onnx", "onnx_int8"} <= set(student)
    assert student["onnx"]["max_abs_logit_diff"] < 1e-3 and student["onnx"]["agreement_with_pytorch"] == 1.0
    ev = read(proj, "metrics/eval.json")["student"]
    assert student["pytorch"]["perplexity"] == pytest.approx(ev["perplexity"], rel=1e-4)
    assert student["onnx"]["perplexity"] == pytest.approx(ev["perplexity"], rel=1e-4)
    assert np.isfinite(student["onnx_int8"]["perplexity"])
    card = (proj / "reports/model_card.md").read_text()
    row_bytes = LogitCache(proj / "artifacts/logits").manifest["bytes_per_row"]
    assert "## Sample completions" in card and f"**{row_bytes} bytes per token**" in card and "compact" in card
    assert "| perplexity |" in card.replace("| model | perplexity |", "| perplexity |")


# --- bad input: one line, before compute ---------------------------------------------------------

def _stages(proj: Path, *names: str) -> None:
    for name in names:
        res = kd(proj, "stage", name)
        assert res.returncode == 0, res.stderr[-2000:]


def _refused(proj: Path, stage: str, *needles: str) -> str:
    res = kd(proj, "stage", stage)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    line = res.stderr.strip().splitlines()[-1]
    assert all(n in line for n in needles), line
    return line


@pytest.fixture
def bad(tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for var, value in project_env(tmp_path).items():
        monkeypatch.setenv(var, value)
    return lm_project(tmp_path, tiny_llama_dir)


@pytest.mark.bad_input
@pytest.mark.parametrize("case", ["lm: student tokenizer differs"])
def test_a_student_with_another_tokenizer_is_refused_before_training(case: str, bad: Path) -> None:
    other = build_llama(bad / "models/other", train_tokenizer(300), layers=2)
    write_params(bad, {"student": {"arch": str(other), "options": {}}})
    _stages(bad, "prepare", "teacher")
    _refused(bad, "train_baseline", "tokenizer differs", "vocab")  # the student's build, as train_student's
    assert not (bad / "artifacts/baseline").exists()


@pytest.mark.bad_input
@pytest.mark.parametrize("case", ["lm: teacher tokenizer is not the data's"])
def test_a_teacher_whose_tokenizer_is_not_the_datas_is_refused(case: str, bad: Path) -> None:
    _stages(bad, "prepare")
    (bad / TEACHER / "tokenizer.json").write_bytes(train_tokenizer(300))
    _refused(bad, "teacher", "tokenizer", "prepare")


@pytest.mark.bad_input
@pytest.mark.parametrize("case", ["lm: seq_len beyond the teacher's positions"])
def test_sequences_longer_than_the_teacher_reads_are_refused(case: str, bad: Path) -> None:
    write_params(bad, {"data": {"seq_len": 512, "max_tokens": 4096}})
    _stages(bad, "prepare")
    _refused(bad, "teacher", "512", "256")


@pytest.mark.bad_input
@pytest.mark.parametrize("case", ["lm: corpus shorter than one sequence"])
def test_a_corpus_shorter_than_one_sequence_is_refused(case: str, bad: Path) -> None:
    (bad / "data/raw").mkdir(parents=True, exist_ok=True)
    (bad / "data/raw/train.txt").write_text("A short document.")
    (bad / "data/raw/test.txt").write_text("Another short one.")
    write_params(bad, {"data": {"source": "text", "train": "data/raw/train.txt", "test": "data/raw/test.txt"}})
    _refused(bad, "prepare", "fewer than one sequence", str(SEQ + 1))


def test_mlflow_models_serve_completes_a_prompt(run: tuple[Path, str]) -> None:
    """`mlflow models serve` on the registered version answers a prompt with the greedy completion."""
    proj, _ = run
    port = free_port()
    log = (proj / "serve.log").open("wb")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", "models:/kd-student/1", "--env-manager", "local",
         "-p", str(port), "-h", "127.0.0.1"], cwd=proj, stdout=log, stderr=subprocess.STDOUT)
    try:
        base, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/ping", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None, (proj / "serve.log").read_text()
                assert time.monotonic() < deadline, "mlflow models serve did not answer /ping"
                time.sleep(0.5)
        body = json.dumps({"dataframe_split": {"columns": ["text"], "data": [["Return the number of"]]},
                           "params": {"max_new_tokens": 5}}).encode()
        req = urllib.request.Request(f"{base}/invocations", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            answer = json.loads(resp.read())["predictions"]
        local = mlflow.pyfunc.load_model("models:/kd-student/1").predict(
            pd.DataFrame({"text": ["Return the number of"]}), params={"max_new_tokens": 5})
        assert answer == list(local)
    finally:  # SIGTERM lets the CLI take its uvicorn child down with it
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()


def test_kd_predict_completes_a_table_of_prompts(run: tuple[Path, str]) -> None:
    proj, _ = run
    pd.DataFrame({"text": ["Return the number of", "def"]}).to_parquet(proj / "prompts.parquet")
    res = kd(proj, "predict", "prompts.parquet", "--version", "1", "--out", "completed.parquet")
    assert res.returncode == 0, res.stderr[-2000:]
    out = pd.read_parquet(proj / "completed.parquet")
    assert list(out.columns) == ["completion"] and len(out) == 2
    status = kd(proj, "status")
    assert status.returncode == 0 and "ppl" in status.stdout, status.stdout  # lm versions in perplexity
