"""`task: lm` — a row is a packed token sequence and each of its positions is a cache row; models are
Hugging Face causal LMs (kd_core.tasks.lm.models), the teacher a pretrained one adopted as it is.

Inputs are a sequence's first `seq_len` tokens (N, L), labels its next tokens (N, L); the cache row
of position t of sequence i is i·L + t (`positions`), so the cache's key, shards, resume and verify
apply unchanged, and the training loop scores the mean over a row's positions.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import pandas as pd
import torch
from torch import nn

from kd_core import data, evaluate
from kd_core.config import Params, StudentParams, TeacherParams, ValidationParams
from kd_core.data import TOKENIZER_FILE, TOKENS, Schema, Splits
from kd_core.errors import UserError
from kd_core.models import META_FILE, ModelSpec, arch_dir
from kd_core.tasks import _hf as hf
from kd_core.tasks._hf import load_tokenizer, max_positions
from kd_core.tasks.lm import data as lm_data
from kd_core.tasks.lm import models as lm_models
from kd_core.tasks.lm import scoring as lm_eval

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from kd_core.policy import ChampionScore
    from kd_core.registry import ChampionInputs
    from kd_core.validation import Suite

PROMPT_TOKENS = 16  # a served model's example prompts: the start of held-out sequences
TEACHER_ARCH = "pretrained"  # the teacher's spec: a causal LM adopted as it is


def _ids(frame: pd.DataFrame) -> np.ndarray:
    """Packed sequences of a prepared split.  # (N, L + 1) int64"""
    return np.stack(frame[lm_data.IDS].to_numpy()).astype(np.int64) if len(frame) else np.zeros((0, 2), np.int64)


class LMTask:
    name = "lm"
    outputs: tuple[str, ...] = ("completions",)
    serving_params: dict = {"max_new_tokens": 32}  # greedy: same prompt, same completion
    headline = "perplexity"
    lower_is_better = True
    classifier = False  # answers with completions
    views = False
    builtin_sources: tuple[str, ...] = ("stdlib",)  # the docstrings of Python's standard library
    file_sources: tuple[str, ...] = ("text", "parquet")  # .txt/.md/.rst files, or tables with a text column
    requirements: tuple[str, ...] = ("transformers", "tokenizers")
    input_name = "input_ids"  # the ONNX input: (B, L) token ids
    dynamic_axes: tuple[int, ...] = (0, 1)

    def check_params(self, params: Params) -> None:
        if params.teachers:
            raise ValueError("teachers: an ensemble of language-model teachers is not supported; use teacher")
        if params.cache.features or params.distill.features:
            raise ValueError("cache.features / distill.features: hidden-state hints are not supported for task lm")

    def describe_teacher(self, teacher: TeacherParams) -> str:
        return f"{teacher.source} (a pretrained causal LM, adopted as it is)"

    def split_expectations(self, name: str, splits: Splits, params: ValidationParams) -> list:
        """Packed sequences are built by prepare itself: the documents have their own suites."""
        from kd_core.validation import packed_expectations

        return packed_expectations(getattr(splits, name), (lm_data.IDS, lm_data.DOC),
                                   "the packed sequences (ids, document)")

    def extra_suites(self, prepared: Path, splits: Splits, params: ValidationParams) -> list[Suite]:
        """Every document, per split, as prepare read it: text present, not blank, not repeated."""
        from kd_core.validation import document_expectations

        path = prepared / lm_data.DOCUMENTS
        if not path.is_file():
            return []
        documents = pd.read_parquet(path).rename(columns={"tokens": TOKENS})
        out = []
        for split in ("train", "test"):
            docs = documents[documents["split"] == split].drop(columns=["split"]).reset_index(drop=True)
            out.append((f"documents_{split}", docs,
                        document_expectations(docs, splits.schema.features[0], None, params), split))
        return out

    def write_card(self, params: Params, workdir: Path, out: Path, data_docs: str) -> dict[str, Path]:
        from kd_core.tasks.lm.card import run_card

        return run_card(params, workdir, out, data_docs)

    def champion_score(self, inputs: ChampionInputs) -> ChampionScore | None:
        from kd_core.tasks.lm.champion import champion_score

        return champion_score(inputs)

    def prepare(self, params: Params, root: Path, out: Path) -> Splits:
        """Documents of the source, split by document, tokenised with the teacher's tokenizer and packed."""
        d = params.data
        source = lm_models.resolve_source(params.teacher.source, root)
        blob = lm_models.source_tokenizer(source)
        tok = load_tokenizer(blob, source)
        train_docs, test_docs = lm_data.read_documents(d, root)
        for split, docs in (("train", train_docs), ("test", test_docs)):
            if not docs:
                raise UserError(f"data ({d.source}): the {split} split has no documents")
        ids = {split: lm_data.token_ids(tok, [t for _, t in docs])
               for split, docs in (("train", train_docs), ("test", test_docs))}
        eos = lm_data.eos_id(tok, source)
        train = lm_data.packed_frame(train_docs, ids["train"], d.seq_len, eos, d.max_tokens)
        test = lm_data.packed_frame(test_docs, ids["test"], d.seq_len, eos, d.max_test_tokens)
        counts = {split: [len(i) for i in doc_ids] for split, doc_ids in ids.items()}
        del ids  # the corpus's ids, 4 bytes a token: gone before the documents table is written
        for split, frame in (("train", train), ("test", test)):
            if len(frame) == 0:
                raise UserError(f"data ({d.source}): the {split} split has {sum(counts[split]) + len(counts[split])} "
                                f"tokens, fewer than one sequence of data.seq_len + 1 = {d.seq_len + 1}")
        vocab = tok.get_vocab_size()
        info = lm_data.LMInfo(d.seq_len, eos, vocab, lm_models.tokenizer_sha256(blob), len(train) * d.seq_len,
                              len(test) * d.seq_len)
        classes = tuple(tok.id_to_token(i) or f"<id {i}>" for i in range(vocab))  # the logits' order
        schema = Schema((d.text_column,), "", classes, info.to_json())
        splits = Splits(train, test, train.iloc[:0], schema)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / TOKENIZER_FILE).write_bytes(blob)
            data.write_prepared(splits, out, Path(tmp) / TOKENIZER_FILE)
        lm_data.write_documents(out / lm_data.DOCUMENTS, train_docs, test_docs, d.text_column, counts)
        return splits

    def describe(self, schema: Schema) -> str:
        return f"a sequence of {schema.text_info['seq_len']} tokens of the teacher's tokenizer (documents packed)"

    def inputs(self, frame: pd.DataFrame, schema: Schema) -> np.ndarray:
        return _ids(frame)[:, :-1]  # (N, L)

    def labels(self, frame: pd.DataFrame, schema: Schema) -> np.ndarray:
        return _ids(frame)[:, 1:]  # (N, L): position t's target is token t + 1

    def cache_inputs(self, splits: Splits, views: np.ndarray | None = None) -> np.ndarray:
        return self.inputs(splits.train, splits.schema)  # every document is labelled text: no transfer rows

    def draw_views(self, n_rows: int, views: int, augment: dict) -> np.ndarray:
        raise NotImplementedError("task lm draws no augmented views")

    def client_inputs(self, frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
        return frame[list(schema.features)]

    def for_training(self, model: nn.Module, params: Params) -> nn.Module:
        return model

    def spec(self, section: TeacherParams | StudentParams, schema: Schema, root: Path | None = None) -> ModelSpec:
        if isinstance(section, TeacherParams):
            return ModelSpec(TEACHER_ARCH, {"source": section.source}, schema, self.name)
        if section.arch not in lm_models.STUDENT_ARCHS and not arch_dir(section.arch, root).is_dir():
            raise UserError(f"student.arch {section.arch!r}: not a language-model student; choose one of "
                            f"{list(lm_models.STUDENT_ARCHS)} or a Hugging Face config directory")
        return ModelSpec(section.arch, dict(section.options), schema, self.name, root)

    def init_dir(self, params: Params, root: Path) -> Path | None:
        """Students start from the adopted teacher (its layers, or a projection of its embeddings)."""
        return root / params.paths.teacher

    def teacher_source(self, source: str, root: Path) -> Path:
        return lm_models.resolve_source(source, root)

    def build(self, spec: ModelSpec, x_train: np.ndarray | None, seed: int | None,
              init: Path | None = None) -> lm_models.CausalLM:
        if init is None or not (init / META_FILE).is_file():
            raise UserError(f"a language-model student is built from the adopted teacher ({init}): "
                            "run the teacher stage")
        teacher, tspec = lm_models.load(init)
        if tspec.schema.text_info["tokenizer_sha256"] != spec.schema.text_info["tokenizer_sha256"]:
            raise UserError(f"{init}: not the teacher the prepared data was tokenised for; "
                            "run prepare and teacher again")
        options = dict(spec.options)
        try:
            if spec.arch == "layers":
                net = hf.layer_subset(teacher.net, list(options.pop("layers")), **options)
            elif spec.arch == "narrow":
                net = lm_models.narrow(teacher.net, seed, **options)
            else:
                own = spec.arch_dir() / TOKENIZER_FILE
                if own.is_file():
                    lm_models.check_same_tokenizer(own.read_bytes(), teacher.tokenizer_json,
                                                   f"student.arch {spec.arch}")
                net = lm_models.from_config_dir(spec.arch_dir(), seed, **options)
        except (TypeError, KeyError) as exc:
            raise UserError(f"student.arch {spec.arch!r} rejected its options {spec.options}: {exc}") from None
        self._check(net, spec.schema, f"student.arch {spec.arch}")
        return lm_models.CausalLM(net, spec.schema.text_info["vocab_size"], teacher.tokenizer_json)

    @staticmethod
    def _check(net: PreTrainedModel, schema: Schema, where: str) -> None:
        """Before any compute: the model predicts every token and reads a whole sequence."""
        lm_models.check_vocab(net, schema.text_info["vocab_size"], where)
        limit = max_positions(net.config)
        if limit is not None and schema.text_info["seq_len"] > limit:
            raise UserError(f"{where} reads at most {limit} positions, data.seq_len is {schema.text_info['seq_len']}")

    def adopt(self, src: Path, section: TeacherParams, schema: Schema, out: Path) -> lm_models.CausalLM:
        """A pretrained causal LM, checked against the prepared data's tokenizer and saved once as bf16
        safetensors (a GGUF file is de-quantized here, so later stages load it in about a second)."""
        if (src / META_FILE).is_file():  # a kd lm model directory
            model, spec = lm_models.load(src)
            if spec.schema.text_info["tokenizer_sha256"] != schema.text_info["tokenizer_sha256"]:
                raise UserError(f"teacher.source {src}: its tokenizer is not the prepared data's; run prepare again")
            lm_models.copy_dir(src, out, model, spec)
            return model
        blob = lm_models.source_tokenizer(src)
        if lm_models.tokenizer_sha256(blob) != schema.text_info["tokenizer_sha256"]:
            raise UserError(f"teacher.source {src}: its tokenizer is not the one the prepared data was tokenised "
                            "with; run the prepare stage again")
        net = lm_models.load_source(src)
        self._check(net, schema, f"teacher.source {src}")
        model = lm_models.CausalLM(net, schema.text_info["vocab_size"], blob)
        lm_models.save(model, self.spec(section, schema), out, dtype=torch.bfloat16)
        return lm_models.load(out)[0]  # the bf16 weights, as every later stage sees them

    def save(self, model: nn.Module, spec: ModelSpec, out: Path) -> None:
        lm_models.save(cast(lm_models.CausalLM, model), spec, out)

    def load(self, path: Path) -> tuple[lm_models.CausalLM, ModelSpec]:
        return lm_models.load(path)

    def fingerprint(self, path: Path) -> str:
        return hf.fingerprint(path)

    def lengths(self, x: np.ndarray, schema: Schema) -> np.ndarray | None:
        return None  # packed: every row is seq_len tokens

    def batch_order(self, model: nn.Module, x: np.ndarray) -> np.ndarray:
        return np.arange(len(x))

    def positions(self, x: np.ndarray) -> int:
        return x.shape[1]

    def cache_batch(self, model: nn.Module, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(rows)

    def cache_logits(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        out = model(batch)  # (B, L, C)
        return out.reshape(-1, out.shape[-1])  # (B·L, C): position t of row i is cache row i·L + t

    def example(self, spec: ModelSpec, batch: int = 1) -> torch.Tensor:
        """`batch` one-token inputs: MACs are per token for a causal LM."""
        return torch.full((batch, 1), spec.schema.text_info["eos_id"], dtype=torch.int64)

    def score(self, loaded: dict[str, tuple[nn.Module, ModelSpec]], splits: Splits,
              weights: dict[str, Path]) -> dict[str, dict]:
        examples = {r: self.example(spec) for r, (_, spec) in loaded.items()}
        nets = {r: m for r, (m, _) in loaded.items()}
        latency = evaluate.batch1_latencies_ms(nets, examples)
        return lm_eval.lm_metrics(nets, examples, self.inputs(splits.test, splits.schema),
                                  self.labels(splits.test, splits.schema), weights, latency,
                                  splits.schema.text_info["eos_id"])

    def metrics(self, model: nn.Module, spec: ModelSpec, scores: evaluate.Scores, weights_file: Path,
                latency_ms: float) -> dict:
        """The contract metrics that next-token sums determine, for one model on the test sequences:
        `scores` over every position (one row of next-token logits each, as predict_logits gives them).
        `kl_to_teacher` needs the teacher's whole distribution and `tokens_per_s` times generation: `score`
        adds both, scoring the test sequences batch by batch itself (the stage's path)."""
        return lm_eval.token_metrics(model, self.example(spec), scores.nll, scores.correct, scores.agree,
                                     scores.rows, weights_file, latency_ms)

    def predict_logits(self, model: nn.Module, x: np.ndarray) -> np.ndarray:
        """Next-token logits of every position of sequences `x` (N, L), on the CPU.  # (N·L, C)"""
        if not len(x):
            return np.zeros((0, cast(lm_models.CausalLM, model).n_classes))
        with torch.inference_mode():
            return np.concatenate([self.cache_logits(model.eval(), torch.from_numpy(x[i:i + 4]))
                                   for i in range(0, len(x), 4)])

    def serving_inputs(self, model: nn.Module, spec: ModelSpec, frame: pd.DataFrame) -> list[list[int]]:
        """Prompts in the model's text column -> their token ids under the model's own tokenizer."""
        col = spec.schema.features[0]
        if col not in frame.columns:
            raise UserError(f"input lacks the prompt column {col!r} (columns: {list(frame.columns)[:8]})")
        values = frame[col].tolist()
        if bad := [i for i, v in enumerate(values) if not isinstance(v, str) or not v.strip()]:
            raise UserError(f"input column {col!r}: {len(bad)} row(s) are not a non-empty prompt, e.g. row "
                            f"{bad[0]}: {values[bad[0]]!r}")
        tok = load_tokenizer(cast(lm_models.CausalLM, model).tokenizer_json, "the model's tokenizer.json")
        return [e.ids for e in tok.encode_batch(values, add_special_tokens=False)]

    def answer(self, model: nn.Module, spec: ModelSpec, frame: pd.DataFrame, params: dict) -> np.ndarray:
        """Greedy completions of the prompts, one string each (new text only).  # (N,)"""
        if (output := params.get("output", self.outputs[0])) not in self.outputs:
            raise UserError(f"unknown output {output!r}; choose one of {list(self.outputs)}")
        n = params.get("max_new_tokens", self.serving_params["max_new_tokens"])
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 4096:
            raise UserError(f"max_new_tokens must be an integer in 1..4096, got {n!r}")
        lm = cast(lm_models.CausalLM, model)
        limit = max_positions(lm.net.config)  # None: no absolute positions to run out of
        if limit is not None and n >= limit:  # a prompt needs at least one position of its own
            raise UserError(f"max_new_tokens {n} leaves no room for a prompt: the model reads at most {limit} "
                            f"positions (max_position_embeddings); ask for fewer than {limit}")
        tok = load_tokenizer(lm.tokenizer_json, "the model's tokenizer.json")
        eos = spec.schema.text_info["eos_id"]
        # a prompt longer than the room left keeps its end, which the completion continues
        keep = None if limit is None else limit - n
        outs = [lm_models.generate(lm, ids[-keep:] if keep else ids, n, eos_id=eos)
                for ids in self.serving_inputs(model, spec, frame)]
        return np.asarray([tok.decode([t for t in o if t != eos]) for o in outs], dtype=object)

    def input_example(self, model: nn.Module, frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
        """Prompts: the first PROMPT_TOKENS tokens of a few held-out sequences, as text."""
        tok = load_tokenizer(cast(lm_models.CausalLM, model).tokenizer_json, "the model's tokenizer.json")
        eos = schema.text_info["eos_id"]
        prompts = [tok.decode([t for t in ids[:PROMPT_TOKENS] if t != eos]) for ids in _ids(frame.head(3))]
        return pd.DataFrame({schema.features[0]: [p if p.strip() else "def" for p in prompts]})
