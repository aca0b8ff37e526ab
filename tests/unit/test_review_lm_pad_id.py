"""The pad id is the tokenizer's own pad token when it names one (its padding setting in tokenizer.json, or
transformers' tokenizer_config.json beside it); the usual pad tokens, <|endoftext|> among them, only otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from kd_core.data import Schema, Splits
from kd_core.tasks import _hf as hf
from kd_core.tasks.text import data as text_data

VOCAB = ["<unk>", "<|endoftext|>", "<|my_pad|>", "hello", "world"]  # <|endoftext|> = 1, <|my_pad|> = 2


def tokenizer(padding: bool):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if padding:
        tok.enable_padding(pad_id=2, pad_token="<|my_pad|>")
    return tok


def tokenised(folder: Path, padding: bool, config: dict | None = None) -> dict:
    folder.mkdir()
    (folder / "tokenizer.json").write_text(tokenizer(padding).to_str())
    if config is not None:
        (folder / text_data.TOKENIZER_CONFIG_FILE).write_text(json.dumps(config))
    frame = pd.DataFrame({"text": ["hello world", "hello"], "label": ["a", "b"]})
    splits = Splits(frame, frame, frame[["text"]].iloc[:0], Schema(("text",), "label", ("a", "b")))
    return text_data.tokenised(splits, folder / "tokenizer.json", 8).schema.text


def test_the_tokenizers_own_padding_setting_comes_first(tmp_path: Path) -> None:
    assert tokenised(tmp_path / "own", padding=True)["pad_id"] == 2
    assert text_data.pad_id(tokenizer(padding=True), tmp_path) == 2  # a tokenizer with its padding on
    loaded = hf.load_tokenizer(tokenizer(padding=True).to_str().encode(), tmp_path)
    assert loaded.padding is None  # load_tokenizer switches padding off: the files say what it was


@pytest.mark.parametrize("pad_token", ["<|my_pad|>", {"content": "<|my_pad|>", "special": True}])
def test_transformers_pad_token_is_read_beside_the_tokenizer(tmp_path: Path, pad_token) -> None:
    assert tokenised(tmp_path / "config", padding=False, config={"pad_token": pad_token})["pad_id"] == 2


def test_without_a_pad_token_of_its_own_a_usual_one(tmp_path: Path) -> None:
    assert tokenised(tmp_path / "none", padding=False)["pad_id"] == 1  # <|endoftext|>
    assert tokenised(tmp_path / "null", padding=False, config={"pad_token": None})["pad_id"] == 1
    assert tokenised(tmp_path / "unknown", padding=False, config={"pad_token": "<nope>"})["pad_id"] == 1
