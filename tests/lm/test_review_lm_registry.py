"""The lm champion is re-scored only when it reads today's tokens: a champion of another tokenizer (grown or
changed) cannot be compared, which stops registration with one line, like a champion that cannot score the
current test set; never a traceback, never a meaningless comparison."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kd_core import registry, tasks
from kd_core.config import Params, PolicyParams
from kd_core.data import Schema
from kd_core.models import ModelSpec
from kd_core.policy import ChampionScore, decide_promotion
from kd_core.tasks.lm import data as lm_data
from kd_core.tasks.lm import models as lm_models
from kd_core.tasks.lm import scoring as lm_eval
from kd_core.tasks.lm.data import LMInfo
from tests.lm.conftest import VOCAB, build_llama, corpus_texts, train_tokenizer, vocab_size

PARAMS = Params.model_validate({"task": "lm", "data": {"source": "stdlib"}})
SEQ = 16


def schema_of(blob: bytes) -> Schema:
    n = vocab_size(blob)
    info = LMInfo(SEQ, 0, n, lm_models.tokenizer_sha256(blob), 100, 4 * SEQ)
    return Schema(("text",), "", tuple(f"t{i}" for i in range(n)), info.to_json())


def model_dir(out: Path, blob: bytes, seed: int) -> Path:
    """A kd lm model directory: a tiny random Llama reading `blob`'s tokens."""
    net = lm_models.load_source(build_llama(out.parent / f"{out.name}-hf", blob, seed=seed, layers=1))
    model = lm_models.CausalLM(net, vocab_size(blob), blob)
    lm_models.save(model, ModelSpec("narrow", {}, schema_of(blob), "lm"), out)
    return out


def evidence(root: Path, blob: bytes, ids: np.ndarray) -> registry._Evidence:
    """Today's test split (packed ids under `blob`) and an eval.json that matches the candidate."""
    schema = schema_of(blob)
    test = pd.DataFrame({lm_data.IDS: pd.Series(list(ids), dtype=object), lm_data.DOC: ["doc"] * len(ids)})
    task = tasks.get("lm")
    x, y = task.inputs(test, schema), task.labels(test, schema)
    nll, _ = lm_eval.nll_per_sequence(tasks.load_model(root / PARAMS.paths.student)[0], x, y)
    evals = {r: {"perplexity": lm_eval.perplexity(nll.sum(), y.size)} for r in ("student", "teacher", "baseline")}
    return registry._Evidence(evals, root / "metrics/eval.json", test, "", "lm", None, schema)


@pytest.fixture(scope="module")
def grown() -> bytes:
    """Today's tokenizer: the fixtures' corpus with more merges (VOCAB + 64 tokens; the first VOCAB the same ids)."""
    return train_tokenizer(VOCAB + 64)


def case(root: Path, today: bytes, champion: bytes, monkeypatch: pytest.MonkeyPatch) -> ChampionScore | None:
    model_dir(root / PARAMS.paths.student, today, seed=0)
    champion_dir = model_dir(root / "champion-model", champion, seed=1)
    ids = np.random.default_rng(0).integers(0, vocab_size(today), (4, SEQ + 1))
    ids[:, 3] = vocab_size(today) - 1  # a token only today's tokenizer has, when it grew
    monkeypatch.setattr(registry.serving, "download_model_dir", lambda uri, dest, root=None: champion_dir)
    return tasks.get("lm").champion_score(registry.ChampionInputs(root, PARAMS, evidence(root, today, ids), 3))


def test_a_champion_of_the_same_tokenizer_is_scored(tmp_path: Path, lm_tokenizer_json: bytes,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    score = case(tmp_path, lm_tokenizer_json, lm_tokenizer_json, monkeypatch)
    assert isinstance(score, ChampionScore) and score.version == 3 and score.perplexity > 1


def test_a_champion_of_a_smaller_vocabulary_is_a_decision_not_a_traceback(tmp_path: Path, lm_tokenizer_json: bytes,
                                                                         grown: bytes,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    score = case(tmp_path, grown, lm_tokenizer_json, monkeypatch)
    assert score.version == 3 and re.fullmatch(r"its tokenizer \([0-9a-f]{12}\) is not the prepared data's "
                                               r"\([0-9a-f]{12}\)", score.incomparable)
    reasons = _decision(score).reasons
    assert [r for r in reasons if r.endswith("fail")] == [
        f"gain_over_champion version 3 not comparable: {score.incomparable}: fail"]
    assert all("\n" not in r for r in reasons)


def test_a_champion_of_a_changed_tokenizer_is_not_compared(tmp_path: Path, lm_tokenizer_json: bytes,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Same vocabulary size, other merges: the ids would index fine and mean other text."""
    other = train_tokenizer(VOCAB, corpus_texts()[::-1][:10])
    assert vocab_size(other) == vocab_size(lm_tokenizer_json) and other != lm_tokenizer_json
    score = case(tmp_path, lm_tokenizer_json, other, monkeypatch)
    assert score.incomparable and _decision(score).decision == "rejected"


def _decision(score: ChampionScore):
    """The policy on an lm candidate that passes every other rule."""
    m = {"perplexity": 20.0, "latency_ms_p50": 1.0, "size_bytes": 10, "accuracy": 0.3}
    return decide_promotion(m, {**m, "perplexity": 10.0, "latency_ms_p50": 10.0}, {**m, "perplexity": 30.0}, score,
                            PolicyParams(min_teacher_retention=0.1))
