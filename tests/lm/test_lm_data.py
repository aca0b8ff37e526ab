"""Documents for `task: lm` (kd_core.tasks.lm.data): packing keeps inputs and targets aligned, the stdlib corpus
is read without importing anything and splits stably, user files are read or refused in one line."""

from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kd_core.config import DataParams
from kd_core.errors import UserError
from kd_core.tasks.lm import data as lm_data

# --- pack: sequences of seq_len + 1 tokens, overlapping by one ---------------------------------------------


def docs_of(lengths: list[int]) -> list[list[int]]:
    """Documents of the given lengths with ids unique across all of them (100, 101, …): eos is 0."""
    out, nxt = [], 100
    for n in lengths:
        out.append(list(range(nxt, nxt + n)))
        nxt += n
    return out


def test_pack_every_stream_token_is_a_target_exactly_once() -> None:
    docs, seq_len = docs_of([5, 9, 1, 13, 4]), 4
    stream = [t for d in docs for t in (*d, 0)]  # 37 tokens: 5 + 9 + 1 + 13 + 4 + 5 eos
    seqs, owner = lm_data.pack(docs, seq_len, eos=0)
    n = (len(stream) - 1) // seq_len  # 9 sequences; the remainder (stream[37 - 0:]) is dropped
    assert seqs.shape == (n, seq_len + 1) == (9, 5) and seqs.dtype == np.int64
    np.testing.assert_array_equal(seqs[:, 0], stream[0:n * seq_len:seq_len])
    targets = seqs[:, 1:].reshape(-1)  # what the model predicts, in row order
    np.testing.assert_array_equal(targets, stream[1:n * seq_len + 1])  # each once, in stream order
    np.testing.assert_array_equal(seqs[:-1, -1], seqs[1:, 0])  # sequence i's last token is i + 1's first
    for row in seqs:  # inputs and targets: position t's target is the token after it in the stream
        i = stream.index(row[0]) if row[0] != 0 else None
        if i is not None:
            assert list(row) == stream[i:i + seq_len + 1]
    assert (seqs == 0).sum() >= 3  # document boundaries are in the stream as eos


def test_pack_owner_is_the_document_a_sequence_starts_in() -> None:
    docs = docs_of([5, 9, 1, 13, 4])
    seqs, owner = lm_data.pack(docs, 4, eos=0)
    starts_in = {t: i for i, d in enumerate(docs) for t in d}
    for row, doc in zip(seqs, owner, strict=True):
        if row[0] != 0:  # a document's token: its own document
            assert starts_in[int(row[0])] == doc
    # stream positions: d0 0..5 (its eos at 5), d1 6..15, d2 16..17, d3 18..31, d4 32..36; starts 0, 4, …, 32
    np.testing.assert_array_equal(owner, [0, 0, 1, 1, 2, 3, 3, 3, 4])
    assert owner.dtype == np.int64


def test_pack_drops_the_remainder_and_short_streams() -> None:
    seqs, owner = lm_data.pack(docs_of([7]), 4, eos=0)  # 8 tokens: one sequence (targets 1..4), 3 left over
    assert seqs.tolist() == [[100, 101, 102, 103, 104]] and owner.tolist() == [0]
    seqs, _ = lm_data.pack(docs_of([8]), 4, eos=0)  # 9 tokens: exactly two sequences
    assert seqs.tolist() == [[100, 101, 102, 103, 104], [104, 105, 106, 107, 0]]
    for docs in (docs_of([3]), docs_of([1, 1]), [], [[]]):  # fewer than seq_len + 1 tokens: no sequence
        seqs, owner = lm_data.pack(docs, 4, eos=0)
        assert seqs.shape == (0, 5) and owner.shape == (0,), docs


def test_pack_keeps_the_first_sequences_joining_only_the_documents_they_reach() -> None:
    """prepare's memory follows data.max_tokens: a capped pack is the full pack's first rows, and int32
    id arrays (what token_ids gives) pack as lists of ints do."""
    docs = docs_of([5, 9, 1, 13, 4])
    seqs, owner = lm_data.pack(docs, 4, eos=0)
    for k in (1, 3, 9, 50):
        got, got_owner = lm_data.pack([np.asarray(d, np.int32) for d in docs], 4, 0, max_sequences=k)
        assert got.dtype == np.int64 and got_owner.dtype == np.int64
        np.testing.assert_array_equal(got, seqs[:k])
        np.testing.assert_array_equal(got_owner, owner[:k])


def test_token_ids_are_the_tokenizers_ids_batch_by_batch(lm_tokenizer_json: bytes,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from kd_core.tasks._hf import load_tokenizer

    tok = load_tokenizer(lm_tokenizer_json, "test")
    texts = ["def f(x): return x", "", "Return the sum.", "a b c d e f g", "x"]
    monkeypatch.setattr(lm_data, "ENCODE_BATCH", 2)  # three batches
    got = lm_data.token_ids(tok, texts)
    want = [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
    assert [g.tolist() for g in got] == want and all(g.dtype == np.int32 for g in got)


def test_packed_frame_caps_the_targets_and_names_documents() -> None:
    names = [("a.txt", ""), ("b.txt", ""), ("c.txt", ""), ("d.txt", ""), ("e.txt", "")]
    docs = docs_of([5, 9, 1, 13, 4])
    full = lm_data.packed_frame(names, docs, 4, 0, None)
    assert list(full.columns) == [lm_data.IDS, lm_data.DOC] and len(full) == 9
    assert full[lm_data.DOC].tolist() == ["a.txt", "a.txt", "b.txt", "b.txt", "c.txt", "d.txt", "d.txt", "d.txt",
                                          "e.txt"]
    seqs, _ = lm_data.pack(docs, 4, 0)
    for cap, rows in ((20, 5), (16, 4), (15, 3), (4, 1), (1000, 9)):
        capped = lm_data.packed_frame(names, docs, 4, 0, cap)
        assert len(capped) == rows, cap
        assert len(capped) * 4 <= cap  # at most `cap` targets, the first ones
        np.testing.assert_array_equal(np.stack(capped[lm_data.IDS].to_list()), seqs[:rows])
        assert capped[lm_data.DOC].tolist() == full[lm_data.DOC].tolist()[:rows]


def test_documents_table_counts_tokens_per_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train, test = [("a", "x y"), ("b", "z")], [("c", "w")]
    monkeypatch.setattr(lm_data, "ENCODE_BATCH", 2)  # two row groups
    lm_data.write_documents(tmp_path / "docs.parquet", train, test, "text", {"train": [2, 1], "test": [3]})
    frame = pd.read_parquet(tmp_path / "docs.parquet")
    assert frame.to_dict("records") == [{"name": "a", "text": "x y", "split": "train", "tokens": 2},
                                        {"name": "b", "text": "z", "split": "train", "tokens": 1},
                                        {"name": "c", "text": "w", "split": "test", "tokens": 3}]


# --- the standard library's docstrings ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def stdlib_docs() -> list[tuple[str, str]]:
    return lm_data.stdlib_documents()


def test_stdlib_documents_import_nothing_and_are_deterministic(stdlib_docs: list[tuple[str, str]]) -> None:
    names = {name for name, _ in stdlib_docs}
    assert {"antigravity", "json", "json.decoder"} <= names  # antigravity opens a browser when imported
    before = set(sys.modules)
    again = lm_data.stdlib_documents()
    new = set(sys.modules) - before
    assert not new & names, sorted(new & names)[:5]
    for name in ("antigravity", "this"):  # `this` prints the Zen of Python when imported
        assert name in before or name not in sys.modules
    assert again == stdlib_docs


def test_stdlib_documents_are_module_docstrings_by_name(stdlib_docs: list[tuple[str, str]]) -> None:
    names = [name for name, _ in stdlib_docs]
    assert names == sorted(names) and len(set(names)) == len(names) > 300
    assert {"os", "json", "json.decoder", "email.mime.text", "collections", "antigravity"} <= set(names)
    for skipped in ("test", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "site-packages"):
        assert not [n for n in names if n == skipped or n.startswith(skipped + ".")], skipped
    assert not [n for n in names if "__init__" in n or "site-packages" in n or n.endswith(".py")]
    assert all(text.strip() for _, text in stdlib_docs)
    text = dict(stdlib_docs)
    assert text["json"].startswith(inspect.cleandoc(json.__doc__))  # the module's docstring first
    assert f"\n\ndumps: {inspect.cleandoc(json.dumps.__doc__)}" in text["json"]  # then each function's, named
    assert "geohash: Compute geohash() using the Munroe algorithm." in text["antigravity"]


def test_stdlib_split_is_by_document_name(stdlib_docs: list[tuple[str, str]],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    params = DataParams(source="stdlib", test_fraction=0.2)
    monkeypatch.setattr(lm_data, "stdlib_documents", lambda: stdlib_docs)
    train, test = lm_data.read_documents(params, Path("unused"))
    assert sorted(train + test) == sorted(stdlib_docs) and not set(train) & set(test)
    assert 0.12 < len(test) / len(stdlib_docs) < 0.28
    fewer = stdlib_docs[::2]  # a Python with other modules: the split of those that remain does not move
    monkeypatch.setattr(lm_data, "stdlib_documents", lambda: fewer)
    train2, test2 = lm_data.read_documents(params, Path("unused"))
    assert set(test2) == set(test) & set(fewer) and set(train2) == set(train) & set(fewer)
    wider = {n for n, _ in stdlib_docs if lm_data._held_out(n, 0.5)}
    assert {n for n, _ in test} < wider  # a larger fraction only adds documents to the test split
    names = ("json", "os", "re", "ast", "csv", "uuid", "abc", "enum", "typing", "pathlib", "random", "string",
             "email.mime.text", "xml.dom", "zipfile", "heapq")  # the same in every process (not hash())
    assert [n for n in names if lm_data._held_out(n, 0.2)] == ["json"]
    assert [n for n in names if lm_data._held_out(n, 0.6)] == ["json", "os", "re", "csv", "uuid", "pathlib",
                                                              "string", "xml.dom"]


# --- the user's files ----------------------------------------------------------------------------------------

def text_params(**kw) -> DataParams:
    return DataParams(**{"source": "text", "train": "train", "test": "test", **kw})


def test_text_source_reads_each_file_as_a_document(tmp_path: Path) -> None:
    (tmp_path / "train/sub").mkdir(parents=True)
    (tmp_path / "train/a.txt").write_text("first document\n", encoding="utf-8")
    (tmp_path / "train/sub/b.md").write_text("# Zweites Dokument — schön\n", encoding="utf-8")
    (tmp_path / "train/notes.rst").write_text("third", encoding="utf-8")
    (tmp_path / "train/image.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff")  # not a text suffix: not read
    (tmp_path / "test.txt").write_text("held out", encoding="utf-8")
    train, test = lm_data.read_documents(text_params(test="test.txt"), tmp_path)
    assert train == [("a.txt", "first document\n"), ("notes.rst", "third"),
                     ("sub/b.md", "# Zweites Dokument — schön\n")]
    assert test == [("test.txt", "held out")]


def test_text_source_refuses_non_utf8_and_empty(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    (tmp_path / "train/good.txt").write_text("fine", encoding="utf-8")
    (tmp_path / "train/latin1.txt").write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    (tmp_path / "test").mkdir()
    (tmp_path / "test/t.txt").write_text("fine", encoding="utf-8")
    with pytest.raises(UserError, match=r"latin1\.txt: not UTF-8 text \(byte 3") as err:
        lm_data.read_documents(text_params(), tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "train/latin1.txt").unlink()
    (tmp_path / "test/t.txt").unlink()
    (tmp_path / "test/data.csv").write_text("a,b")
    with pytest.raises(UserError, match=r"data\.test .*test: no \.txt/\.md/\.rst files"):
        lm_data.read_documents(text_params(), tmp_path)
    with pytest.raises(UserError, match="data.train .*missing: not found"):
        lm_data.read_documents(text_params(train="missing"), tmp_path)


def write_table(path: Path, column: str, values: list) -> Path:
    pd.DataFrame({column: values, "id": range(len(values))}).to_parquet(path, index=False)
    return path


def parquet_params(column: str = "body") -> DataParams:
    return DataParams(source="parquet", train="train.parquet", test="test.parquet", text_column=column)


def test_parquet_source_reads_the_text_column(tmp_path: Path) -> None:
    write_table(tmp_path / "train.parquet", "body", ["one", "two", "ünïcode"])
    write_table(tmp_path / "test.parquet", "body", ["three"])
    train, test = lm_data.read_documents(parquet_params(), tmp_path)
    assert train == [("train.parquet:0", "one"), ("train.parquet:1", "two"), ("train.parquet:2", "ünïcode")]
    assert test == [("test.parquet:0", "three")]


@pytest.mark.parametrize(("values", "row", "shown"), [
    (["fine", None, "fine", None], 1, "nan"),  # a null: pandas 3 reads a string column's nulls as NaN
    ([list(range(200)), [1, 2]], 0, "array([ 0, 1, 2, 3,"),  # token lists: numpy arrays, a long repr
    ([1.5, 2.5], 0, "1.5"),
])
def test_parquet_source_refuses_values_that_are_not_text(tmp_path: Path, values: list, row: int,
                                                         shown: str) -> None:
    write_table(tmp_path / "train.parquet", "body", values)
    write_table(tmp_path / "test.parquet", "body", ["fine"])
    with pytest.raises(UserError) as err:
        lm_data.read_documents(parquet_params(), tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 300, msg
    assert "train.parquet: text column 'body'" in msg and f"first at row {row}: " in msg and shown in msg
    assert f"has {sum(not isinstance(v, str) for v in values)} value(s)" in msg


def test_parquet_source_names_a_missing_column(tmp_path: Path) -> None:
    write_table(tmp_path / "train.parquet", "text", ["fine"])
    write_table(tmp_path / "test.parquet", "body", ["fine"])
    with pytest.raises(UserError, match=r"train\.parquet: text column 'body' not found \(columns: \['text', 'id'\]\)"):
        lm_data.read_documents(parquet_params(), tmp_path)


# --- the end-of-text token ------------------------------------------------------------------------------------

def word_tokenizer(tokens: list[str]):  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, models

    return Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=tokens[0]))


def test_eos_id_finds_the_end_of_text_token(lm_tokenizer_json: bytes) -> None:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(lm_tokenizer_json.decode())
    assert lm_data.eos_id(tok, Path("t")) == tok.token_to_id("<|endoftext|>") == 0
    assert lm_data.eos_id(word_tokenizer(["<unk>", "a", "</s>", "b"]), Path("t")) == 2
    both = word_tokenizer(["<unk>", "</s>", "a", "<|endoftext|>"])
    assert lm_data.eos_id(both, Path("t")) == 3  # the first of EOS_TOKENS that is there
    with pytest.raises(UserError, match=r"teacher/tokenizer\.json: the tokenizer has no end-of-text token"):
        lm_data.eos_id(word_tokenizer(["<unk>", "a", "b"]), Path("teacher/tokenizer.json"))
