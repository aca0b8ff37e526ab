"""lm serving fits prompt + max_new_tokens into the model's positions: a long prompt keeps its end, and a
max_new_tokens that leaves no room for a prompt is one line naming both numbers (a GPT-2-class model, with
learned absolute positions, otherwise fails with an IndexError past its last position)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from kd_core.data import Schema
from kd_core.errors import UserError
from kd_core.models import ModelSpec
from kd_core.tasks._hf import quiet_transformers
from kd_core.tasks.lm import LMTask
from kd_core.tasks.lm import models as lm_models
from kd_core.tasks.lm.data import LMInfo
from tests.lm.conftest import corpus_texts, vocab_size

POSITIONS = 64


@pytest.fixture(scope="module")
def gpt2(lm_tokenizer_json: bytes) -> tuple[lm_models.CausalLM, ModelSpec]:
    from transformers import GPT2Config, GPT2LMHeadModel

    n = vocab_size(lm_tokenizer_json)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=n, n_positions=POSITIONS, n_embd=32, n_layer=1, n_head=2, bos_token_id=0,
                        eos_token_id=0)
    with quiet_transformers():
        net = GPT2LMHeadModel(config).eval()
    info = LMInfo(16, 0, n, lm_models.tokenizer_sha256(lm_tokenizer_json), 100, 100)
    spec = ModelSpec("narrow", {}, Schema(("text",), "", tuple(f"t{i}" for i in range(n)), info.to_json()), "lm")
    return lm_models.CausalLM(net, n, lm_tokenizer_json), spec


def long_prompt() -> pd.DataFrame:
    return pd.DataFrame({"text": [corpus_texts()[0][:2000], "def"]})


def test_a_long_prompt_keeps_its_end_and_is_answered(gpt2, monkeypatch: pytest.MonkeyPatch) -> None:
    model, spec = gpt2
    task, frame = LMTask(), long_prompt()
    full = task.serving_inputs(model, spec, frame)
    assert len(full[0]) > POSITIONS and len(full[1]) < POSITIONS
    seen, generate = [], lm_models.generate
    monkeypatch.setattr(lm_models, "generate", lambda m, ids, n, eos_id=None: seen.append(ids) or generate(
        m, ids, n, eos_id=eos_id))
    with quiet_transformers():
        out = task.answer(model, spec, frame, {"max_new_tokens": 16})
    assert out.shape == (2,) and all(isinstance(s, str) for s in out)
    assert seen[0] == full[0][-(POSITIONS - 16):]  # the prompt's end: what the completion continues
    assert seen[1] == full[1]  # a prompt that fits is untouched


def test_max_new_tokens_beyond_the_positions_is_one_line(gpt2) -> None:
    model, spec = gpt2
    for n in (POSITIONS, 500):
        with pytest.raises(UserError, match=rf"^max_new_tokens {n} leaves no room for a prompt: the model reads "
                                            rf"at most {POSITIONS} positions") as err:
            LMTask().answer(model, spec, long_prompt(), {"max_new_tokens": n})
        assert "\n" not in str(err.value)


def test_one_position_left_for_the_prompt_still_answers(gpt2) -> None:
    model, spec = gpt2
    with quiet_transformers():
        out = LMTask().answer(model, spec, long_prompt(), {"max_new_tokens": POSITIONS - 1})
    assert out.shape == (2,) and np.all([isinstance(s, str) for s in out])
