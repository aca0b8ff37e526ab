"""Hugging Face helpers every transformer task shares: tokenizers, quiet loading, layer subsets, PCA
embeddings, position limits and a model directory's fingerprint.

The tasks that read tokens (`kd_core.tasks.*`) import this module; they never import each other.
transformers is imported inside the functions, so a task without transformers never pays for it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from kd_core.data import TOKENIZER_FILE
from kd_core.errors import UserError
from kd_core.models import META_FILE, WEIGHTS_FILE, ModelSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel

CONFIG_FILE = "config.json"


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers reports every freshly initialised head at warning level; the stages say what they built."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def encoder_layers(net: PreTrainedModel) -> nn.ModuleList:
    """The stack of transformer layers: the ModuleList as long as the config's layer count."""
    n = net.config.num_hidden_layers
    for module in net.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise UserError(f"{type(net).__name__}: no list of {n} layers found to take a subset of")


def layer_subset(source: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """DistilBERT's (and Minitron's) initialisation: `source` with only the listed layers, each keeping
    its weights; encoders and causal LMs alike."""
    n = source.config.num_hidden_layers
    if not layers or sorted(set(layers)) != list(layers) or layers[0] < 0 or layers[-1] >= n:
        raise UserError(f"student.options.layers {layers}: give increasing, distinct layer numbers in 0..{n - 1}")
    student = copy.deepcopy(source)
    stack = encoder_layers(student)
    kept = [stack[i] for i in layers]
    for i in reversed(range(len(stack))):
        del stack[i]
    stack.extend(kept)
    for i, layer in enumerate(stack):  # a decoder's KV cache is indexed by each attention's layer_idx
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = i
    student.config.num_hidden_layers = len(layers)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in layers]
    return student


def input_embeddings(net: PreTrainedModel) -> torch.Tensor:
    """A Hugging Face model's word-embedding matrix (a Parameter).  # (V, H)"""
    weight = net.get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor)
    return weight


def pca_projection(embeddings: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (H,) and the top-`width` principal directions (H, width) of an embedding matrix (V, H)."""
    mean = embeddings.mean(dim=0)
    _, _, vt = torch.linalg.svd(embeddings - mean, full_matrices=False)  # rows of vt: directions by variance
    return mean, vt[:width].T


POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2}  # positions these keep for padding


def max_positions(config) -> int | None:
    """Token positions a model can read (None: no absolute position embeddings to run out of)."""
    n = getattr(config, "max_position_embeddings", None)
    return None if n is None else n - POSITION_OFFSET.get(getattr(config, "model_type", ""), 0)


def check_positions(config, max_length: int, where: str) -> None:
    """Ids up to data.max_length must fit the position embeddings, or training dies on the first long batch."""
    limit = max_positions(config)
    if limit is not None and max_length > limit:
        raise UserError(f"{where} reads at most {limit} token positions (max_position_embeddings), "
                        f"data.max_length is {max_length}; set data.max_length to {limit} or less")


TOKENIZER_CONFIG_FILE = "tokenizer_config.json"  # transformers' settings for the tokenizer.json beside it
GENERATION_CONFIG_FILE = "generation_config.json"  # what save_pretrained writes beside a generating model


def fingerprint(path: Path) -> str:
    """sha256 over weights, config, tokenizer and spec: the teacher part of the cache key; transformers'
    tokenizer and generation settings too where the directory has them (older ones have neither)."""
    h = hashlib.sha256()
    for name in (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE):
        h.update(hashlib.sha256((path / name).read_bytes()).digest())
    for name in (TOKENIZER_CONFIG_FILE, GENERATION_CONFIG_FILE):
        if (path / name).is_file():
            h.update(name.encode() + hashlib.sha256((path / name).read_bytes()).digest())
    h.update(json.dumps(json.loads((path / META_FILE).read_text()), sort_keys=True).encode())
    return h.hexdigest()


def load_tokenizer(blob: bytes, where: Path | str):  # -> tokenizers.Tokenizer
    """A tokenizer from the bytes of its tokenizer.json (`where` names it in errors)."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(blob.decode("utf-8"))
    except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
        raise UserError(f"{where}: not a readable tokenizer: {str(exc).splitlines()[0][:200]}") from None
    tok.no_padding()
    tok.no_truncation()
    return tok


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tokenizer_config(blob: bytes, max_length: int | None, pad_id: int | None, bos_id: int | None = None,
                     eos_id: int | None = None, padding_side: str | None = None) -> dict:
    """transformers' settings for tokenizer.json as it is, so `AutoTokenizer` reads a kd directory: the pad
    token kd pads with, BOS/EOS where the tokenizer holds them as special tokens (naming any other token
    would make transformers split text around it, unlike kd), and only the inputs kd feeds (no
    token_type_ids)."""
    special = {t["id"]: t["content"] for t in json.loads(blob).get("added_tokens", []) if t.get("special")}
    out: dict = {"tokenizer_class": "PreTrainedTokenizerFast", "model_input_names": ["input_ids", "attention_mask"],
                 "clean_up_tokenization_spaces": False}
    if padding_side is not None:
        out["padding_side"] = padding_side
    if max_length is not None:
        out["model_max_length"] = max_length
    if pad_id is not None and (pad := load_tokenizer(blob, TOKENIZER_FILE).id_to_token(pad_id)) is not None:
        out["pad_token"] = pad
    for name, i in (("bos_token", bos_id), ("eos_token", eos_id)):  # a config may list several EOS ids
        if isinstance(i, int) and i in special:
            out[name] = special[i]
    return out


def check_loaded(info: dict, problem: str) -> None:
    """A from_pretrained loading report as load_into's one line: every weight in the file, none left over."""
    missing, unexpected = sorted(info.get("missing_keys", ())), sorted(info.get("unexpected_keys", ()))
    if bad := sorted(info.get("mismatched_keys", ())):  # (key, shape in the file, shape the config asks for)
        key, got, want = bad[0]
        raise UserError(f"{problem}: {key} is {list(got)} in the file, {list(want)} by the config "
                        f"({len(bad)} in all)")
    if missing or unexpected:
        raise UserError(f"{problem}: missing {missing[:3]} ({len(missing)} in all), "
                        f"unexpected {unexpected[:3]} ({len(unexpected)} in all)")


# --- kd directories of the token tasks: Hugging Face directories with kd's model.json beside ---------

OLD_PREFIX = "net."  # weight names of directories written before save_pretrained: kd's wrapper's own
ONE_FILE = "1000GB"  # save_pretrained's shard size: kd reads one model.safetensors, never shards
DIR_FILES = (META_FILE, WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE)


def dir_spec(path: Path, task: str) -> ModelSpec:
    """The spec of a kd directory of `task` (its name fills a model.json that names none); a missing file
    is a one-line UserError."""
    from kd_core.data import Schema

    if missing := [f for f in DIR_FILES if not (path / f).is_file()]:
        raise UserError(f"{path} is not a kd {task} model directory (missing {', '.join(missing)})")
    meta = json.loads((path / META_FILE).read_text())
    return ModelSpec(meta["arch"], meta.get("options", {}), Schema.from_json(meta), meta.get("task", task))


def is_old_layout(weights: Path) -> bool:
    """Weights under kd's own names (`net.` + the Hugging Face name), as save wrote them before
    save_pretrained; a file that is not safetensors is a one-line UserError."""
    from safetensors import safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            keys = list(f.keys())
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{weights}: not a valid safetensors file: {exc}") from None
    return bool(keys) and all(k.startswith(OLD_PREFIX) for k in keys)
