"""A causal-LM student as GGUF files for llama.cpp (architecture `llama`), f16 and q8_0, each checked by
loading it back with transformers' GGUF reader and comparing next-token logits with the PyTorch student.

The file holds what llama.cpp's convert_hf_to_gguf.py writes for a LlamaForCausalLM: the `llama.*`
hyperparameters, the weights under llama.cpp's names (Q and K rows permuted for its rotary layout,
which transformers' reader undoes), and the byte-level BPE tokenizer (`tokenizer.ggml.model` gpt2) of
the student's tokenizer.json. An embedding padded beyond the tokenizer (Qwen-style) gets `[PADn]`
tokens, as llama.cpp pads one. `kd export --gguf` finds this module by the task's name (`run`).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from kd_core.errors import UserError
from kd_core.tasks._hf import load_tokenizer, quiet_transformers
from kd_core.tasks.lm.models import CausalLM, tokenizer_sha256
from kd_core.tasks.lm.scoring import perplexity

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from kd_core.config import Params

ARCH = "llama"  # the one llama.cpp architecture written here: LLaMA-family students (SmolLM2's)
FORMATS = ("f16", "q8_0")  # half precision, and llama.cpp's 8-bit blocks (32 weights + one f16 scale)
REPORT_FILE = "gguf.json"
STEM = "student"  # files are student.f16.gguf and student.q8_0.gguf
CHECK_SEQUENCES = 8  # held-out test sequences each file is scored on: enough for a perplexity, seconds on CPU
BATCH = 4  # sequences per forward pass while checking
SAMPLE = "The quick brown fox, 42 times: <|endoftext|> again!"  # the tokenizer check's text (ids must match)

# HF LlamaForCausalLM parameter -> llama.cpp tensor name ({} = the layer); lm_head only when untied
_LAYER = {"self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k",
          "self_attn.v_proj.weight": "attn_v", "self_attn.o_proj.weight": "attn_output",
          "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down",
          "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm"}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")


@dataclass(frozen=True)
class GGUFCheck:
    """One written file, against the PyTorch student on the same held-out sequences."""

    file: str
    size_bytes: int
    max_abs_logit_diff: float
    perplexity: float
    pytorch_perplexity: float
    tokenizer_round_trip: bool  # transformers' tokenizer from the file gives the student's ids for SAMPLE


# --- what a llama GGUF file can hold -------------------------------------------------------------

def check_llama(net: PreTrainedModel) -> None:
    """The student must be a plain LLaMA: what the llama.cpp `llama` architecture and transformers'
    reader represent (no biases, SiLU gate, unscaled RoPE). Anything else is a one-line UserError."""
    config = net.config
    model_type = getattr(config, "model_type", None)
    if model_type != ARCH:
        raise UserError(f"GGUF export writes llama-architecture students; this student is a {model_type!r} model "
                        "(student.arch: use layers/narrow of a llama teacher, or a llama config directory)")
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    problems = [f"{k} true" for k in ("attention_bias", "mlp_bias") if getattr(config, k, False)]
    if (act := getattr(config, "hidden_act", "silu")) != "silu":
        problems.append(f"hidden_act {act}")
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope_type {rope.get('rope_type', rope.get('type'))}")
    if problems:
        raise UserError(f"GGUF export: this llama student has {', '.join(problems)}, which the writer cannot "
                        "represent (it writes plain LLaMA: no biases, SiLU, unscaled RoPE)")


def rope_theta(config) -> float:
    rope = dict(getattr(config, "rope_parameters", None) or {})
    return float(rope.get("rope_theta", getattr(config, "rope_theta", None) or 10000.0))


def head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF -> llama.cpp rotary layout of a Q (n_head heads) or K (n_kv heads) weight: each head's two
    halves interleaved, as convert_hf_to_gguf.py's LlamaModel.permute.  # (n_head·d, H) -> same shape"""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(net: PreTrainedModel) -> dict[str, np.ndarray]:
    """The student's weights in float32 under llama.cpp's names, Q/K permuted; the output head only
    when it is not the embedding itself (transformers' reader ties the embeddings when it is absent)."""
    check_llama(net)
    config = net.config
    params = dict(net.named_parameters(remove_duplicate=False))
    tied = net.get_output_embeddings().weight is net.get_input_embeddings().weight
    out: dict[str, np.ndarray] = {}
    for key, p in params.items():
        w = p.detach().to(torch.float32).cpu().numpy()
        if key in _GLOBAL:
            if key == "lm_head.weight" and tied:
                continue
            out[_GLOBAL[key]] = w
            continue
        m = _LAYER_KEY.fullmatch(key)
        if not m or m[2] not in _LAYER:
            raise UserError(f"GGUF export: the student has a weight the llama format has no place for: {key}")
        name = _LAYER[m[2]]
        if name == "attn_q":
            w = permute(w, config.num_attention_heads)
        elif name == "attn_k":
            w = permute(w, config.num_key_value_heads)
        out[f"blk.{m[1]}.{name}.weight"] = w
    return out


# --- the tokenizer -------------------------------------------------------------------------------

def _pre_tokenizer(obj: dict) -> str:
    """llama.cpp's name for how the tokenizer splits text before BPE (`tokenizer.ggml.pre`)."""
    pre = obj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"  # GPT-2's split regex (what transformers' reader rebuilds for gpt2 files)
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # every digit alone, then GPT-2's regex (SmolLM's tokenizer.json)
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        try:  # the split regexes transformers' reader knows by llama.cpp's names (llama3, qwen2, gpt-4o, …)
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
        except ImportError:
            GGUF_PRE_TOKENIZER_SPLITS = {}  # noqa: N806  (a transformers without it: no regex is known)
        pattern = steps[0].get("pattern", {}).get("Regex")
        for name, regex in GGUF_PRE_TOKENIZER_SPLITS.items():  # the first name per regex
            if regex == pattern:
                return name
    raise UserError(f"GGUF export: the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) is not "
                    "one llama.cpp knows by name; the file would split text differently")


def _special_ids(tok, obj: dict, config, eos_id: int | None) -> dict[str, int | bool]:
    """bos/eos/padding ids and whether a BOS/EOS is added around a text, as the tokenizer does it."""
    special = {t["id"] for t in obj.get("added_tokens", []) if t.get("special")}
    plain, framed = tok.encode("a", add_special_tokens=False).ids, tok.encode("a", add_special_tokens=True).ids
    add_bos = len(framed) > len(plain) and framed[0] in special
    add_eos = len(framed) > len(plain) and framed[-1] in special

    def named(i) -> int | None:
        return i if isinstance(i, int) and i in special else None  # config ids that are a byte are not special

    ids: dict[str, int | bool] = {"add_bos": add_bos, "add_eos": add_eos}
    eos = eos_id if eos_id is not None else named(config.eos_token_id) if named(config.eos_token_id) is not None \
        else min(special, default=None)
    bos = framed[0] if add_bos else named(config.bos_token_id)
    pad = named(config.pad_token_id)
    ids |= {k: v for k, v in (("bos", bos), ("eos", eos), ("pad", pad if pad is not None else eos)) if v is not None}
    return ids


def tokenizer_fields(tokenizer_json: bytes, rows: int, config, eos_id: int | None) -> dict:
    """The tokenizer.ggml.* values of a byte-level BPE tokenizer.json: tokens in id order (padded to the
    embedding's `rows` with [PADn]), token types, merges "a b", special ids."""
    obj = json.loads(tokenizer_json)
    model = obj.get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UserError(f"GGUF export: the tokenizer is {model.get('type')!r}, the writer handles byte-level BPE")
    by_id: dict[int, tuple[str, int]] = {i: (t, 1) for t, i in model["vocab"].items()}  # 1: NORMAL
    for t in obj.get("added_tokens", []):  # 3: CONTROL (special), 4: USER_DEFINED, as llama.cpp marks them
        by_id[t["id"]] = (t["content"], 3 if t.get("special") else 4)
    n = max(by_id) + 1
    if n > rows:
        raise UserError(f"GGUF export: the tokenizer has {n} tokens, the student's embedding only {rows} rows")
    tokens = [by_id.get(i, (f"[PAD{i}]", 5)) for i in range(rows)]  # 5: UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    tok = load_tokenizer(tokenizer_json, "the student's tokenizer")
    return {"pre": _pre_tokenizer(obj), "tokens": [t for t, _ in tokens], "types": [k for _, k in tokens],
            "merges": merges, **_special_ids(tok, obj, config, eos_id)}


# --- writing -------------------------------------------------------------------------------------

def write(model: CausalLM, path: Path, fmt: str, eos_id: int | None = None) -> Path:
    """`model` as one GGUF file at `path`: fmt f16 (2-D weights f16, norms f32) or q8_0 (2-D weights in
    Q8_0 blocks; a row not a multiple of the block stays f16, as llama.cpp's converter falls back)."""
    import gguf

    if fmt not in FORMATS:
        raise UserError(f"GGUF export: format {fmt!r} is not one of {list(FORMATS)}")
    net, config = model.net, model.net.config
    tensors = gguf_tensors(net)  # checks the architecture first
    rows = tensors["token_embd.weight"].shape[0]
    tok = tokenizer_fields(model.tokenizer_json, rows, config, eos_id)
    file_type = gguf.LlamaFileType.MOSTLY_F16 if fmt == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0
    path.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(path, ARCH)
    w.add_name("kd student")  # transformers' reader treats a llama file named *mistral* as Mistral
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(rope_theta(config))
    w.add_rope_dimension_count(head_dim(config))  # transformers' reader: head_dim
    w.add_key_length(head_dim(config))
    w.add_value_length(head_dim(config))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(rows)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("pad", w.add_pad_token_id)):
        if key in tok:
            add(int(tok[key]))
    w.add_add_bos_token(bool(tok["add_bos"]))
    w.add_add_eos_token(bool(tok["add_eos"]))
    for name, t in tensors.items():
        if t.ndim == 1:
            w.add_tensor(name, t.astype(np.float32))  # norms stay f32, as llama.cpp keeps 1-D tensors
        elif fmt == "q8_0" and t.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            q = gguf.quants.quantize(t, gguf.GGMLQuantizationType.Q8_0)  # (rows, bytes) uint8
            w.add_tensor(name, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, t.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# --- checking ------------------------------------------------------------------------------------

def load(path: Path) -> PreTrainedModel:
    """A GGUF file through transformers' reader, de-quantized to float32."""
    from transformers import AutoModelForCausalLM

    with quiet_transformers(), contextlib.redirect_stderr(io.StringIO()):  # the reader's progress bar
        return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def tokenizer_round_trip(path: Path, tokenizer_json: bytes, text: str = SAMPLE) -> bool:
    """Whether transformers' tokenizer rebuilt from the file gives the student's ids for `text`."""
    from transformers import AutoTokenizer

    with quiet_transformers(), contextlib.redirect_stderr(io.StringIO()):
        theirs = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ours = load_tokenizer(tokenizer_json, "the student's tokenizer").encode(text, add_special_tokens=False).ids
    return list(theirs(text, add_special_tokens=False)["input_ids"]) == list(ours)


@torch.inference_mode()
def compare(model: CausalLM, path: Path, x: np.ndarray, y: np.ndarray) -> GGUFCheck:
    """The file against the PyTorch student on held-out sequences: the largest |Δlogit| over the
    tokenizer's C logits, and both perplexities.  # x, y (N, L) ids and next-token targets"""
    other = CausalLM(load(path), model.n_classes, model.tokenizer_json)  # drops the [PADn] logits too
    diff, nll, nll_pt = 0.0, 0.0, 0.0
    for s in range(0, len(x), BATCH):
        xb, yb = torch.from_numpy(x[s:s + BATCH]), torch.from_numpy(y[s:s + BATCH])  # (b, L)
        ref, got = model.eval()(xb).float(), other(xb).float()  # (b, L, C)
        diff = max(diff, float((ref - got).abs().max()))
        nll_pt -= float(F.log_softmax(ref, -1).gather(-1, yb[..., None]).sum())
        nll -= float(F.log_softmax(got, -1).gather(-1, yb[..., None]).sum())
    return GGUFCheck(path.name, path.stat().st_size, diff, perplexity(nll, y.size), perplexity(nll_pt, y.size),
                     tokenizer_round_trip(path, model.tokenizer_json))


def export(model: CausalLM, out: Path, x: np.ndarray, y: np.ndarray, eos_id: int | None = None,
           formats: tuple[str, ...] = FORMATS, stem: str = STEM) -> dict[str, GGUFCheck]:
    """`out`/<stem>.<fmt>.gguf per format, each checked on (x, y); the checks also go to `out`/gguf.json."""
    if not len(x):
        raise UserError("GGUF export: no held-out sequences to check the files on")
    checks = {fmt: compare(model, write(model, out / f"{stem}.{fmt}.gguf", fmt, eos_id), x, y) for fmt in formats}
    report = {fmt: asdict(c) for fmt, c in checks.items()}
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    for c in checks.values():
        if not math.isfinite(c.max_abs_logit_diff):
            raise UserError(f"GGUF export: {out / c.file} gives non-finite logits")
    return checks


def default_out(params: Params) -> Path:
    """Beside the ONNX files: artifacts/onnx -> artifacts/gguf."""
    return Path(params.paths.onnx).parent / "gguf"


def run(params: Params, root: Path, model_dir: Path, out: Path) -> dict[str, GGUFCheck]:
    """`kd export --gguf`: the model directory's student as GGUF files in `out`, checked on the first
    CHECK_SEQUENCES sequences of the prepared test split."""
    from kd_core import data, tasks
    from kd_core.fs import atomic_dir

    model, spec = tasks.load_model(model_dir)
    if not isinstance(model, CausalLM):
        raise UserError(f"{model_dir}: not a causal language model; GGUF export writes those")
    splits = data.read_prepared(root / params.paths.prepared)
    own, today = tokenizer_sha256(model.tokenizer_json), splits.schema.text_info["tokenizer_sha256"]
    if own != today:  # today's ids mean nothing to it (a grown vocabulary would index past its embeddings)
        raise UserError(f"{model_dir}: its tokenizer ({own[:12]}) is not the prepared data's ({today[:12]}); "
                        "GGUF export checks a model on held-out sequences of its own tokenizer")
    task = tasks.for_params(params)
    x = task.inputs(splits.test, splits.schema)[:CHECK_SEQUENCES]  # (N, L)
    y = task.labels(splits.test, splits.schema)[:CHECK_SEQUENCES]  # (N, L)
    eos = spec.schema.text_info.get("eos_id")
    with atomic_dir(out) as tmp:  # the last export stays until a new one is complete and checked
        return export(model, tmp, x, y, eos)
