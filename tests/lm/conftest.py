"""Fixtures for `task: lm`, built offline in about a second: a byte-level BPE tokenizer trained here on
standard-library docstrings (read with `ast`, nothing imported) and tiny random Llama directories that use
it, so no test ever reaches a model hub.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Callable
from pathlib import Path

import pytest

from kd_core.tasks.lm.data import _docstrings
from tests.reliability.conftest import Damage

EOS = "<|endoftext|>"  # the tokenizer's only special token, id 0: what kd_core.tasks.lm.data.eos_id finds
VOCAB = 384  # 256 bytes + the end-of-text token + 127 merges
# modules whose docstrings make the tokenizer's corpus: plain English about Python, stable across versions
CORPUS_MODULES = ("abc", "base64", "bisect", "calendar", "colorsys", "contextlib", "copy", "csv", "dataclasses",
                  "difflib", "enum", "fnmatch", "fractions", "functools", "glob", "gzip", "heapq", "hmac",
                  "json/__init__", "json/decoder", "json/encoder", "keyword", "linecache", "numbers", "operator",
                  "pprint", "queue", "random", "shlex", "shutil", "statistics", "string", "textwrap", "timeit",
                  "tokenize", "uuid", "warnings", "weakref", "zipfile")


def corpus_texts() -> list[str]:
    """The docstrings of CORPUS_MODULES, one text per module."""
    root = Path(sysconfig.get_path("stdlib"))
    return [_docstrings((root / f"{name}.py").read_text(encoding="utf-8")) for name in CORPUS_MODULES]


def train_tokenizer(vocab_size: int = VOCAB, texts: list[str] | None = None) -> bytes:
    """A GPT-2-style byte-level BPE tokenizer.json: every byte is a token, so any text encodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus_texts() if texts is None else texts, trainer)
    return tok.to_str().encode()


def vocab_size(tokenizer_json: bytes) -> int:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json.decode()).get_vocab_size()


def build_llama(out: Path, tokenizer_json: bytes, tied: bool = True, seed: int = 0, layers: int = 4,
                vocab: int | None = None) -> Path:
    """A Hugging Face causal-LM directory: config.json, model.safetensors (random weights), tokenizer.json.
    `vocab`: the embedding rows (default the tokenizer's; more is a padded, Qwen-style vocabulary)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab or vocab_size(tokenizer_json), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=tied)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)  # safetensors, the only weights kd loads
    (out / "tokenizer.json").write_bytes(tokenizer_json)
    assert (out / "model.safetensors").is_file()
    return out


@pytest.fixture(scope="session")
def lm_tokenizer_json() -> bytes:
    """The tiny byte-level BPE tokenizer (VOCAB tokens, <|endoftext|> = 0) as tokenizer.json bytes."""
    return train_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, lm_tokenizer_json: bytes) -> Path:
    """A tiny random Llama (hidden 32, 4 layers, GQA 4/2 heads, tied embeddings, ~25 k parameters)."""
    return build_llama(tmp_path_factory.mktemp("lm") / "tiny-llama", lm_tokenizer_json)


@pytest.fixture(scope="session")
def tiny_llama_untied_dir(tmp_path_factory: pytest.TempPathFactory, lm_tokenizer_json: bytes) -> Path:
    """The same architecture with its own output head (tie_word_embeddings false), other seed."""
    return build_llama(tmp_path_factory.mktemp("lm") / "tiny-llama-untied", lm_tokenizer_json, tied=False, seed=1)


@pytest.fixture
def tally(record_property: Callable[[str, object], None]) -> Damage:
    """The reliability suite's damage record (tests/reliability/conftest.py), for the lm cases."""
    return Damage(record_property)
