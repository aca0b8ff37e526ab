"""Fixtures for `task: text`, built offline in seconds: a tiny BERT encoder directory (WordPiece tokenizer
trained here, random weights) and parquet tables of three topics, so no test ever reaches a model hub.

The topics share a pool of filler words and each has its own vocabulary (with accents and non-English
words, so the tokenizer's normalisation is exercised); a classifier that reads the tokens can separate
them in a few epochs, which is what lets the pipeline test finish on two cores.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import BIN, ROOT, git, new_project, write_params

TOPICS: dict[str, list[str]] = {
    "cuisine": ["crème", "brûlée", "sauce", "oven", "recipe", "café", "butter", "garlic", "soufflé", "bake",
                "flour", "pâtisserie", "tortilla", "jalapeño", "simmer", "knife", "spätzle", "ragoût"],
    "musique": ["guitar", "chanson", "piano", "rhythm", "melody", "concerto", "drummer", "opéra", "tempo",
                "fado", "violin", "chorus", "saxophone", "naïve", "ballad", "flamenco", "lied", "rondò"],
    "sport": ["goal", "équipe", "stadium", "coach", "referee", "match", "fútbol", "sprint", "medal",
              "tennis", "marathon", "trainer", "penalty", "dribble", "olympique", "señor", "keeper", "ski"],
}
SHARED = ["the", "a", "and", "today", "très", "with", "we", "über", "mañana", "is", "was", "very", "ça",
          "of", "in", "to", "my", "friend", "said", "really", "again", "so", "déjà", "vu"]
LABELS = sorted(TOPICS)  # the class order kd takes from the training labels
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # ids 0..4 in this order
TEXT, LABEL = "text", "topic"
ENCODER = "data/raw/encoder"  # a project's copy of the encoder: inside paths.raw, as a user keeps it
NARROW = {"hidden": 16, "layers": 1, "heads": 2, "intermediate": 32}
# examples/text/params.yaml made small enough for 2 cores, with a policy that never decides a test's outcome
TINY_TEXT = {
    "data": {"source": "parquet", "train": "data/raw/train.parquet", "test": "data/raw/test.parquet",
             "transfer": "data/raw/transfer.parquet", "text_column": TEXT, "label_column": LABEL, "max_length": 32},
    "teacher": {"init": ENCODER, "epochs": 4, "batch_size": 32, "lr": 0.003},  # ~0.99 test accuracy
    "student": {"arch": "narrow", "options": NARROW},
    "cache": {"batch_size": 64},
    "train": {"epochs": 5, "batch_size": 32, "lr": 0.01, "device": "cpu", "patience": None},  # 3 epochs: chance
    "policy": {"min_teacher_retention": 0.0, "min_gain_over_baseline": -1.0, "max_latency_ratio": 100.0,
               "max_size_bytes": None, "max_class_drop": 1.0, "min_gain_over_champion": -1.0, "max_p_value": 1.0,
               "max_int8_accuracy_drop": None},
    "distill": {"search": None},
}


def sentence(rng: np.random.Generator, topic: str) -> str:
    """3-6 topic words among 2-6 shared ones: 7-14 tokens with [CLS]/[SEP], always under max_length 32."""
    words = [*rng.choice(TOPICS[topic], rng.integers(3, 7)), *rng.choice(SHARED, rng.integers(2, 7))]
    rng.shuffle(words)
    return " ".join(words).capitalize() + "."


def corpus(n: int, seed: int) -> pd.DataFrame:
    """`n` distinct labelled documents, topics balanced by drawing them uniformly."""
    rng = np.random.default_rng(seed)
    rows, seen = [], set()
    while len(rows) < n:
        topic = LABELS[rng.integers(len(LABELS))]
        text = sentence(rng, topic)
        if text not in seen:
            seen.add(text)
            rows.append((text, topic))
    return pd.DataFrame(rows, columns=[TEXT, LABEL])


def train_tokenizer(texts: list[str], vocab_size: int = 400):  # -> tokenizers.Tokenizer
    """A BERT-style WordPiece tokenizer: lowercase, accents kept, [CLS] … [SEP] around every document."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIALS))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    tok.decoder = decoders.WordPiece()
    return tok


def build_encoder(out: Path, texts: list[str], seed: int = 0, layers: int = 4) -> Path:
    """A Hugging Face encoder directory as `teacher.init` expects: config.json, model.safetensors, tokenizer.json."""
    import torch
    from transformers import BertConfig, BertModel

    tok = train_tokenizer(texts)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    config = BertConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=128,
                        pad_token_id=tok.token_to_id("[PAD]"))
    torch.manual_seed(seed)
    BertModel(config).save_pretrained(out)  # safetensors, the only weights kd loads
    assert (out / "model.safetensors").is_file()
    return out


def other_tokenizer(path: Path) -> Path:
    """A tokenizer.json that is not the tiny encoder's (another corpus, a smaller vocabulary) at `path`."""
    train_tokenizer(corpus(200, seed=11)[TEXT].tolist(), vocab_size=250).save(str(path))
    return path


def student_config(folder: Path, vocab_size: int, positions: int = 128) -> Path:
    """A Hugging Face config directory (config.json only) usable as `student.arch`."""
    from transformers import BertConfig

    folder.mkdir(parents=True, exist_ok=True)
    config = BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=positions, pad_token_id=0)
    config.to_json_file(folder / "config.json")
    return folder


@dataclass(frozen=True)
class Tables:
    """Parquet files of the tiny text corpus: labelled train/test, text-only transfer."""

    train: Path
    test: Path
    transfer: Path


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny encoder (vocab ~300, hidden 32, 4 layers, ~100 k parameters), built once per session."""
    texts = corpus(600, seed=100)[TEXT].tolist()  # its own draw: the tokenizer never sees the test rows
    return build_encoder(tmp_path_factory.mktemp("encoder") / "tiny-bert", texts)


@pytest.fixture(scope="session")
def text_tables(tmp_path_factory: pytest.TempPathFactory) -> Tables:
    """300 train / 90 test / 300 transfer documents, disjoint, written once per session."""
    folder = tmp_path_factory.mktemp("text-tables")
    everything = corpus(690, seed=7)
    train, test = everything.iloc[:300], everything.iloc[300:390]
    transfer = everything.iloc[390:][[TEXT]]
    out = Tables(folder / "train.parquet", folder / "test.parquet", folder / "transfer.parquet")
    for frame, path in ((train, out.train), (test, out.test), (transfer, out.transfer)):
        frame.reset_index(drop=True).to_parquet(path, index=False)
    return out


def project_env(tmp: Path) -> dict[str, str]:
    """Its own MLflow store and Prefect home, the venv's kd and dvc first on PATH (threads per stage:
    tests/threads.py)."""
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}",
            "PREFECT_HOME": str(tmp / "prefect"), "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "GIT_AUTHOR_NAME": "kd test", "GIT_AUTHOR_EMAIL": "test@kd.invalid",
            "GIT_COMMITTER_NAME": "kd test", "GIT_COMMITTER_EMAIL": "test@kd.invalid"}


@contextmanager
def text_project(tmp: Path, encoder: Path, tables: Tables) -> Iterator[Path]:
    """A committed project with examples/text/params.yaml made tiny (TINY_TEXT), the tables and the encoder
    under data/raw, its environment set and the cwd in it until the block ends (for module fixtures)."""
    import mlflow

    with pytest.MonkeyPatch.context() as mp:
        for var, value in project_env(tmp).items():
            mp.setenv(var, value)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])  # an earlier test may have set another store
        proj = new_project(tmp / "proj", {})
        shutil.copy2(ROOT / "examples/text/params.yaml", proj / "params.yaml")
        for name in ("train", "test", "transfer"):
            shutil.copy2(getattr(tables, name), proj / f"data/raw/{name}.parquet")
        shutil.copytree(encoder, proj / ENCODER)
        write_params(proj, TINY_TEXT)
        git(proj, "init", "-q")
        git(proj, "add", "-A")
        git(proj, "commit", "-qm", "text project")
        mp.chdir(proj)
        yield proj
