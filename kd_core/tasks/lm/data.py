"""Documents for `task: lm`: the sources (the standard library's docstrings, the user's parquet tables
or plain-text files), split by document, tokenised with the teacher's tokenizer and packed.

A packed sequence is `data.seq_len + 1` consecutive tokens of the split's documents joined by the
end-of-text token: the model reads the first `seq_len`, and position t's target is token t + 1, so
one sequence holds `seq_len` cache rows (row = sequence × seq_len + position). Consecutive sequences
overlap by that one token, so every token of the stream is a target exactly once. The prepared ids
are part of the data fingerprint, and with it the cache key: targets can never be misaligned with
the inputs they were computed from.
"""

from __future__ import annotations

import ast
import hashlib
import sys
import sysconfig
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from kd_core.config import DataParams
from kd_core.data import read_parquet
from kd_core.errors import UserError

IDS, DOC = "kd_input_ids", "document"  # packed split columns: seq_len + 1 ids; the document it starts in
DOCUMENTS = "documents.parquet"  # beside the splits: every document, for validation and the card's prompts
TEXT_SUFFIXES = (".txt", ".md", ".rst")
# test suites, GUI code and frozen-module fixtures: not prose
SKIP_STDLIB = ("test", "tests", "idle_test", "idlelib", "lib2to3", "tkinter", "turtledemo", "site-packages",
               "ensurepip", "__phello__", "__hello__.py")


def python_version() -> str:
    """major.minor of the running interpreter, whose standard library the stdlib source reads."""
    return f"{sys.version_info.major}.{sys.version_info.minor}"


@dataclass(frozen=True)
class LMInfo:
    """What turns documents into model inputs; travels in schema.json and every model.json."""

    seq_len: int
    eos_id: int
    vocab_size: int  # the tokenizer's: logits beyond it (a padded vocabulary) are never targets
    tokenizer_sha256: str
    train_tokens: int
    test_tokens: int
    # the Python that read the documents (major.minor): the stdlib source is its standard library, which
    # changes between versions, so a different Python is different data (schema.json is fingerprinted)
    python: str = field(default_factory=python_version)

    def to_json(self) -> dict:
        return asdict(self)


# --- sources: (name, text) documents --------------------------------------------------------------

def _docstrings(source: str) -> str:
    """A module's docstrings — the module's, then each class's and function's, outer before inner —
    read with `ast`: nothing is imported, so no module's import-time side effects run."""
    tree = ast.parse(source)
    parts = []
    for node in [tree, *ast.walk(tree)]:
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc and node is tree:
                parts.append(doc)
            elif doc and not isinstance(node, ast.Module):
                parts.append(f"{node.name}: {doc}")
    return "\n\n".join(dict.fromkeys(parts))  # a module is walked once; drop repeats


def stdlib_documents() -> list[tuple[str, str]]:
    """The running interpreter's standard library (Python major.minor: the corpus changes between versions,
    see LMInfo.python), one document per module (its docstrings), sorted by module name: the demo corpus
    that needs no install."""
    root = Path(sysconfig.get_path("stdlib"))
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(p in SKIP_STDLIB or p.startswith(".") for p in rel.parts):
            continue
        try:
            text = _docstrings(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):  # a few files are templates or Python 2
            continue
        if text.strip():
            docs.append((".".join(rel.with_suffix("").parts).removesuffix(".__init__"), text))
    return sorted(docs)  # by name: the path order puts xml/dom/NodeFilter.py before xml/dom/__init__.py


def _held_out(name: str, fraction: float) -> bool:
    """A document's split from its name alone: stable when other documents come and go."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64 < fraction


def _sample_order(docs: list[tuple[str, str]], seed: int) -> list[tuple[str, str]]:
    """Documents in the order of a seeded hash of their names, so the data.max_tokens prefix that packing
    keeps is a sample of the corpus, not its alphabetical start; stable when other documents come and go."""
    return sorted(docs, key=lambda d: hashlib.sha256(f"{seed}\0{d[0]}".encode()).digest())


def _text_files(path: Path, what: str) -> list[tuple[str, str]]:
    """A .txt/.md/.rst file, or every such file under a directory, one document each (UTF-8)."""
    if not path.exists():
        raise UserError(f"{what} {path}: not found")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES)
    if not files:
        raise UserError(f"{what} {path}: no {'/'.join(TEXT_SUFFIXES)} files")
    docs = []
    for f in files:
        try:
            docs.append((str(f.relative_to(path) if path.is_dir() else f.name), f.read_text(encoding="utf-8")))
        except UnicodeDecodeError as exc:
            raise UserError(f"{f}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    return docs


def _parquet_documents(path: Path, column: str, what: str) -> list[tuple[str, str]]:
    df = read_parquet(path, what)
    if column not in df.columns:
        raise UserError(f"{path}: text column {column!r} not found (columns: {list(df.columns)[:8]}); "
                        "set data.text_column")
    bad = [i for i, v in enumerate(df[column]) if not isinstance(v, str)]
    if bad:
        first = " ".join(repr(df[column].iloc[bad[0]]).split())  # one line: an array's repr spans several
        raise UserError(f"{path}: text column {column!r} has {len(bad)} value(s) that are not text "
                        f"(first at row {bad[0]}: {first[:60]})")
    return [(f"{path.name}:{i}", v) for i, v in enumerate(df[column])]


def read_documents(params: DataParams, root: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, test) documents of the configured source; each document is in exactly one split."""
    if params.source == "stdlib":
        docs = _sample_order(stdlib_documents(), params.seed)
        test = [d for d in docs if _held_out(d[0], params.test_fraction)]
        return [d for d in docs if not _held_out(d[0], params.test_fraction)], test
    assert params.train and params.test  # config: data.source parquet and text need data.train and data.test
    read = (lambda p, w: _parquet_documents(p, params.text_column, w)) if params.source == "parquet" \
        else _text_files
    return read(root / params.train, "data.train"), read(root / params.test, "data.test")


# --- tokens ---------------------------------------------------------------------------------------

EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<|im_end|>", "<eos>", "[SEP]")


def eos_id(tok, where: Path) -> int:
    """The token that separates documents in the packed stream."""
    for token in EOS_TOKENS:
        if (i := tok.token_to_id(token)) is not None:
            return int(i)
    raise UserError(f"{where}: the tokenizer has no end-of-text token (looked for {list(EOS_TOKENS)})")


ENCODE_BATCH = 256  # documents tokenised at a time: a tokenizer Encoding (ids, offsets, token strings, masks)
# costs many times a token's 4-byte int32 id, so the corpus's Encodings are never held at once


def token_ids(tok, texts: list[str]) -> list[np.ndarray]:
    """Each document's token ids (int32), tokenised ENCODE_BATCH documents at a time, so prepare's memory
    grows by 4 bytes a token of the corpus, not by its Encodings and lists of Python ints.  # (n_i,)"""
    out: list[np.ndarray] = []
    for i in range(0, len(texts), ENCODE_BATCH):
        out += [np.asarray(e.ids, np.int32) for e in tok.encode_batch(texts[i:i + ENCODE_BATCH],
                                                                       add_special_tokens=False)]
    return out


def pack(docs: list, seq_len: int, eos: int, max_sequences: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Documents' ids joined by `eos`, cut into sequences of seq_len + 1 tokens overlapping by one,
    and the document each sequence starts in; the first `max_sequences` at most.
    # -> (N, seq_len + 1) int64, (N,) int64

    The remainder shorter than a sequence is dropped (at most seq_len tokens of the split). Only the
    documents the kept sequences reach are joined, so memory follows the sequences kept, not the corpus.
    """
    ends = np.cumsum([len(d) + 1 for d in docs], dtype=np.int64)  # (D,) stream position after each eos
    n = max(0, (int(ends[-1]) - 1) // seq_len) if len(docs) else 0
    n = n if max_sequences is None else min(n, max_sequences)
    if not n:
        return np.zeros((0, seq_len + 1), np.int64), np.zeros(0, np.int64)
    used = int(np.searchsorted(ends, n * seq_len + 1)) + 1  # documents covering the n·seq_len + 1 tokens needed
    stream = np.concatenate([np.append(np.asarray(d, np.int64), eos) for d in docs[:used]])
    starts = np.arange(n) * seq_len
    owner = np.searchsorted(ends, starts, side="right").astype(np.int64)  # the document holding each start
    return stream[starts[:, None] + np.arange(seq_len + 1)], owner


def packed_frame(docs: list[tuple[str, str]], ids: list, seq_len: int, eos: int,
                 max_tokens: int | None) -> pd.DataFrame:
    """A split's packed sequences (at most `max_tokens` targets, but at least one sequence) with the
    document each starts in."""
    seqs, owner = pack(ids, seq_len, eos, None if max_tokens is None else max(1, max_tokens // seq_len))
    return pd.DataFrame({IDS: pd.Series(list(seqs), dtype=object), DOC: [docs[i][0] for i in owner]})


def write_documents(path: Path, train: list[tuple[str, str]], test: list[tuple[str, str]], column: str,
                    tokens: dict[str, list[int]]) -> None:
    """Every document with its split and token count (`tokens`: per split, each document's) as a parquet
    table, what validation checks and the card prompts from. Written ENCODE_BATCH documents per row group:
    one table of the whole corpus would copy every text once more (Arrow strings) at once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("name", pa.string()), (column, pa.string()), ("split", pa.string()), ("tokens", pa.int64())])
    rows = [(name, text, split, tokens[split][i])
            for split, docs in (("train", train), ("test", test)) for i, (name, text) in enumerate(docs)]
    with pq.ParquetWriter(path, schema) as writer:
        for i in range(0, len(rows), ENCODE_BATCH):
            part = list(zip(*rows[i:i + ENCODE_BATCH], strict=True))
            writer.write_table(pa.table([pa.array(c, f.type) for c, f in zip(part, schema, strict=True)],
                                        schema=schema))
