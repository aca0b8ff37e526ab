"""Transformer text classifiers for `task: text`: the teacher, both kinds of student, and their directory.

Every model is a Hugging Face `AutoModelForSequenceClassification` inside `TextClassifier`, which takes
right-padded token ids and returns logits. Students come from the encoder the teacher was made from
(`teacher.init`, or the given teacher): `layers` keeps a subset of its layers with their weights
(DistilBERT's initialisation), `narrow` is a thinner transformer whose word embeddings are the encoder's
projected onto their top principal components, and a config directory is any architecture that reads the
same vocabulary. transformers is imported inside the functions: the table task never pays for it.

A model directory is a Hugging Face one: `model.safetensors` (the weights under Hugging Face's names, never
a pickle), `config.json` (with the classes as id2label), `tokenizer.json` (the teacher's) and
`tokenizer_config.json`, so `AutoModelForSequenceClassification`, `AutoTokenizer` and `pipeline` read it;
beside them `model.json` (kd's spec: task, classes, TextInfo).
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn

from kd_core.data import TOKENIZER_FILE
from kd_core.errors import UserError
from kd_core.models import META_FILE, WEIGHTS_FILE, ModelSpec, load_into
from kd_core.tasks._hf import (
    CONFIG_FILE,
    ONE_FILE,
    TOKENIZER_CONFIG_FILE,
    check_loaded,
    dir_spec,
    input_embeddings,
    is_old_layout,
    load_tokenizer,
    pca_projection,
    quiet_transformers,
    tokenizer_config,
)

if TYPE_CHECKING:  # transformers is imported where it is used (the table task never pays for it)
    from transformers import PreTrainedModel

STUDENT_ARCHS = ("layers", "narrow")  # or a directory holding a Hugging Face config.json
NARROW_DEFAULTS = {"hidden": 128, "layers": 2, "heads": 2, "intermediate": 512}


class TextClassifier(nn.Module):
    """Token ids (B, L), right-padded with `pad_id` -> logits (B, K).

    Columns that are padding in every row of a batch are dropped before the encoder runs (`trim`), so a
    batch of short documents costs what its longest one costs; export switches this off, as ONNX graphs
    take the sequence length as given.
    """

    def __init__(self, net: PreTrainedModel, pad_id: int, tokenizer_json: bytes) -> None:
        super().__init__()
        self.net, self.pad_id, self.tokenizer_json, self.trim = net, pad_id, tokenizer_json, True
        self.mask: torch.Tensor | None = None  # the last forward's (B, L) padding mask, for feature pooling

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, L) int64 -> (B, K)
        mask = ids != self.pad_id  # (B, L)
        # on an accelerator the trim would wait for the device to report the length: callers trim on
        # the host there (trim_padding), as the cache's teacher pass does
        if self.trim and ids.device.type == "cpu" and not (torch.compiler.is_compiling()
                                                           or torch.compiler.is_exporting()):
            used = mask.any(dim=0).nonzero()
            keep = int(used[-1]) + 1 if len(used) else 1
            ids, mask = ids[:, :keep], mask[:, :keep]
        self.mask = mask
        return self.net(input_ids=ids, attention_mask=mask.long()).logits


def _labels(classes: tuple) -> dict:
    return {"num_labels": len(classes), "id2label": {i: str(c) for i, c in enumerate(classes)},
            "label2id": {str(c): i for i, c in enumerate(classes)}}


HEAD_PREFIXES = ("classifier", "score", "pre_classifier", "pooler", "bert.pooler", "roberta.pooler")  # new for a head


def pretrained(path: Path, classes: tuple, require_head: bool = False) -> PreTrainedModel:
    """A local encoder (or classifier) as a sequence classifier over `classes`; safetensors only.
    `require_head`: the directory must hold a trained head for these classes (a given teacher)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"{path}: no {CONFIG_FILE}; a text teacher is a local Hugging Face model directory")
    if not any(path.glob("*.safetensors")):
        raise UserError(f"{path}: no safetensors weights (pickled .bin weights are not loaded)")
    with quiet_transformers():
        config = AutoConfig.from_pretrained(path)
        names = [config.id2label[i] for i in sorted(config.id2label)] if config.id2label else []
        if names and set(names) == set(map(str, classes)) and names != list(map(str, classes)):
            raise UserError(f"{path}: predicts classes {names}, the data's class order is {list(classes)}")
        try:
            net, info = AutoModelForSequenceClassification.from_pretrained(
                path, use_safetensors=True, ignore_mismatched_sizes=True, output_loading_info=True,
                **_labels(classes))
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"{path}: cannot load as a sequence classifier: {str(exc).splitlines()[0][:200]}") from None
    new = [*info.get("missing_keys", ()), *(k for k, *_ in info.get("mismatched_keys", ()))]
    if body := sorted(k for k in new if not k.startswith(HEAD_PREFIXES)):
        raise UserError(f"{path}: {len(body)} encoder weights are not in its safetensors (e.g. {body[0]}); "
                        "give a Hugging Face model directory whose weights match its config.json")
    if require_head and new:
        raise UserError(f"teacher.source {path}: no trained classification head for {len(classes)} classes "
                        f"({len(new)} weights missing, e.g. {sorted(new)[0]}); to fine-tune it, set "
                        f"teacher.source: train and teacher.init: {path}")
    return net


def from_config(config) -> PreTrainedModel:
    from transformers import AutoModelForSequenceClassification

    with quiet_transformers():
        return AutoModelForSequenceClassification.from_config(config)


def narrow(source: PreTrainedModel, seed: int | None, hidden: int = 128, layers: int = 2, heads: int = 2,
           intermediate: int = 512) -> PreTrainedModel:
    """A thin transformer on the source's vocabulary: word embeddings = the source's, centred and projected
    onto their top `hidden` principal components; every other weight random (seeded)."""
    h_src = source.config.hidden_size
    if hidden > h_src or hidden % heads:
        raise UserError(f"student.options: hidden {hidden} must be ≤ the teacher's {h_src} and a multiple of "
                        f"heads {heads}")
    config = copy.deepcopy(source.config)
    config.hidden_size, config.num_hidden_layers = hidden, layers
    config.num_attention_heads, config.intermediate_size = heads, intermediate
    if seed is not None:
        torch.manual_seed(seed)
    student = from_config(config)
    src_emb, dst_emb = input_embeddings(source), input_embeddings(student)  # (V, H)
    mean, proj = pca_projection(src_emb.detach().float(), hidden)
    with torch.no_grad():
        dst_emb.copy_((src_emb.float() - mean) @ proj)  # (V, hidden)
    return student


def from_config_dir(path: Path, source: PreTrainedModel, classes: tuple, seed: int | None) -> PreTrainedModel:
    """Any architecture from a Hugging Face config directory, on the teacher's vocabulary (random weights)."""
    from transformers import AutoConfig

    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"student.arch {path}: not a Hugging Face config directory (no {CONFIG_FILE}); "
                        f"or choose one of {list(STUDENT_ARCHS)}")
    config = AutoConfig.from_pretrained(path, **_labels(classes))
    if config.vocab_size != source.config.vocab_size:
        raise UserError(f"student.arch {path}: vocabulary of {config.vocab_size} tokens, the teacher's tokenizer "
                        f"has {source.config.vocab_size}; a student must read the teacher's tokens")
    if seed is not None:
        torch.manual_seed(seed)
    return from_config(config)


def check_tokenizer(path: Path, teacher_sha256: str) -> None:
    """A directory that brings its own tokenizer must bring the teacher's."""
    own = path / TOKENIZER_FILE
    if own.is_file() and hashlib.sha256(own.read_bytes()).hexdigest() != teacher_sha256:
        raise UserError(f"{own}: differs from the teacher's tokenizer; a student must read the teacher's tokens "
                        "(cached logits are per token sequence of the teacher's tokenizer)")


# --- the model directory --------------------------------------------------------------------------

def save(model: TextClassifier, spec: ModelSpec, out: Path) -> None:
    """A Hugging Face directory (`save_pretrained`: weights under their own names, config.json) with the
    tokenizer transformers reads (tokenizer.json, the teacher's bytes, and tokenizer_config.json), and
    kd's spec beside: `AutoModelForSequenceClassification` and `pipeline` load it as kd does."""
    info = spec.schema.text_info
    with quiet_transformers():
        model.net.save_pretrained(out, max_shard_size=ONE_FILE)
    (out / TOKENIZER_FILE).write_bytes(model.tokenizer_json)
    config = tokenizer_config(model.tokenizer_json, info["max_length"], info["pad_id"],
                              getattr(model.net.config, "bos_token_id", None),
                              getattr(model.net.config, "eos_token_id", None), padding_side="right")
    (out / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2))
    (out / META_FILE).write_text(json.dumps(spec.to_json(), indent=2))


def copy_dir(src: Path, out: Path, model: TextClassifier, spec: ModelSpec) -> None:
    """A kd directory (`model`, `spec` loaded from it) into `out`: file for file, or saved again in Hugging
    Face's layout if written before it, so the copy is a Hugging Face directory too (the same weights)."""
    if is_old_layout(src / WEIGHTS_FILE):
        save(model, spec, out)
        return
    for name in (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, META_FILE):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)


def load(path: Path) -> tuple[TextClassifier, ModelSpec]:
    """A kd text model directory; weights through safetensors, so loading never executes code.

    Directories written before save wrote Hugging Face's layout hold kd's own names (`net.` + the Hugging
    Face name) and load as they were written; either way a weight missing or left over is an error."""
    from transformers import AutoConfig, AutoModelForSequenceClassification


    spec = dir_spec(path, "text")
    weights, problem = path / WEIGHTS_FILE, f"{path / WEIGHTS_FILE} does not match its {CONFIG_FILE}"
    if is_old_layout(weights):
        with quiet_transformers():
            net = from_config(AutoConfig.from_pretrained(path))
        model = TextClassifier(net, spec.schema.text_info["pad_id"], (path / TOKENIZER_FILE).read_bytes())
        load_into(model, load_file(str(weights)), problem)
        return model.eval(), spec
    with quiet_transformers():
        try:
            net, info = AutoModelForSequenceClassification.from_pretrained(
                path, use_safetensors=True, dtype=torch.float32, ignore_mismatched_sizes=True,
                output_loading_info=True)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise UserError(f"{problem}: {str(exc).strip().splitlines()[0][:200]}") from None
    check_loaded(info, problem)
    return TextClassifier(net, spec.schema.text_info["pad_id"], (path / TOKENIZER_FILE).read_bytes()).eval(), spec


def tokenizer(model: TextClassifier):  # -> tokenizers.Tokenizer
    """The model's own tokenizer, parsed once per loaded model."""
    if getattr(model, "_tokenizer", None) is None:
        model._tokenizer = load_tokenizer(model.tokenizer_json, "the model's tokenizer.json")
    return model._tokenizer


def example_ids(spec: ModelSpec, batch: int) -> torch.Tensor:
    """`batch` documents of the data's median length in tokens, no padding.  # (batch, L)"""
    info = spec.schema.text_info
    return torch.full((batch, info["example_tokens"]), info["pad_id"] + 1, dtype=torch.int64)


def trim_padding(ids: np.ndarray, pad_id: int) -> np.ndarray:
    """Right-padded ids without the columns that are padding in every row (at least one column).  # (B, L')"""
    used = np.flatnonzero((ids != pad_id).any(axis=0))
    return ids[:, :used[-1] + 1 if len(used) else 1]


def by_length(ids: np.ndarray, pad_id: int) -> np.ndarray:
    """Row order by number of real tokens: batches of similar length, trimmed to little padding.  # (N,)"""
    return np.argsort((ids != pad_id).sum(axis=1), kind="stable")


@torch.inference_mode()
def predict_logits(model: TextClassifier, ids: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits of padded id rows, batched by length (each batch trimmed to its longest row).  # (N, L) -> (N, K)"""
    model.eval()
    order = by_length(ids, model.pad_id)  # (N,)
    out = [model(torch.from_numpy(ids[order[i:i + batch_size]])).float().numpy()
           for i in range(0, len(ids), batch_size)]
    if not out:
        return np.zeros((0, 0), np.float32)
    logits = np.empty((len(ids), out[0].shape[1]), np.float32)
    logits[order] = np.concatenate(out)
    return logits
