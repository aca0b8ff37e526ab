"""A kd lm model directory is a standard Hugging Face one: AutoModelForCausalLM, AutoTokenizer and `pipeline`
read it without a missing or left-over weight and answer as kd does, tied embeddings stay tied and a bf16
teacher is stored in bf16; directories written the earlier way (kd's `net.` names, a tied head recorded as an
alias) still load; a file whose weights do not fit is refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kd_core.data import Schema
from kd_core.errors import UserError
from kd_core.models import WEIGHTS_FILE, ModelSpec
from kd_core.tasks import _hf as hf
from kd_core.tasks.lm import models as lm_models
from kd_core.tasks.lm.data import EOS_TOKENS, LMInfo
from kd_core.tasks.lm.models import CausalLM
from kd_core.tasks.lm.task import LMTask
from tests.lm.conftest import EOS, vocab_size

PROMPTS = ["Return the number of items in a list.", "def f(x):\n    return x", "  spaces, ünïcode and <tags>"]
HF_FILES = {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "model.json"}


@pytest.fixture(scope="module")
def spec(lm_tokenizer_json: bytes) -> ModelSpec:
    n = vocab_size(lm_tokenizer_json)
    assert EOS in EOS_TOKENS
    info = LMInfo(16, 0, n, lm_models.tokenizer_sha256(lm_tokenizer_json), 100, 100)  # <|endoftext|> is id 0
    return ModelSpec("pretrained", {}, Schema(("text",), "", tuple(f"t{i}" for i in range(n)), info.to_json()), "lm")


@pytest.fixture(scope="module", params=["tied", "untied"])
def model(request: pytest.FixtureRequest, tiny_llama_dir: Path, tiny_llama_untied_dir: Path,
          lm_tokenizer_json: bytes) -> CausalLM:
    src = tiny_llama_dir if request.param == "tied" else tiny_llama_untied_dir
    return CausalLM(lm_models.load_source(src), vocab_size(lm_tokenizer_json), lm_tokenizer_json).eval()


@pytest.fixture(scope="module")
def ids(lm_tokenizer_json: bytes) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(2).integers(0, vocab_size(lm_tokenizer_json), (3, 16)))  # (3, 16)


def tied(net) -> bool:
    emb, head = net.get_input_embeddings().weight, net.get_output_embeddings().weight
    return emb.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()


def hf_load(path: Path):
    from transformers import AutoModelForCausalLM

    net, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return net.eval()


def test_auto_model_loads_every_weight_with_kd_logits_and_tie(model: CausalLM, spec: ModelSpec, ids: torch.Tensor,
                                                              tmp_path: Path) -> None:
    lm_models.save(model, spec, tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} >= HF_FILES
    stored = load_file(str(tmp_path / "m" / WEIGHTS_FILE))
    assert not any(k.startswith("net.") for k in stored)
    assert ("lm_head.weight" in stored) == (not tied(model.net))  # a tied weight once
    net = hf_load(tmp_path / "m")
    assert tied(net) == tied(model.net) == net.config.tie_word_embeddings
    with torch.inference_mode():
        got, want = net(input_ids=ids).logits[..., :model.n_classes], model(ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    lm_models.save(model, spec, tmp_path / "again")
    assert hf.fingerprint(tmp_path / "again") == hf.fingerprint(tmp_path / "m")  # the same model, the same identity


def test_a_bf16_teacher_is_stored_in_bf16_and_the_model_is_left_alone(model: CausalLM, spec: ModelSpec,
                                                                     ids: torch.Tensor, tmp_path: Path) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lm_models.save(model, spec, tmp_path / "bf16", dtype=torch.bfloat16)
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())  # the caller's model: unchanged
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert tied(model.net) == model.net.config.tie_word_embeddings
    assert {t.dtype for t in load_file(str(tmp_path / "bf16" / WEIGHTS_FILE)).values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    net = hf_load(tmp_path / "bf16")
    assert tied(net) == tied(model.net)
    loaded, _ = lm_models.load(tmp_path / "bf16")  # kd: float32, the bf16 values
    assert {p.dtype for p in loaded.parameters()} == {torch.float32} and tied(loaded.net) == tied(model.net)
    for key, value in model.net.state_dict().items():
        assert torch.equal(loaded.net.state_dict()[key], value.to(torch.bfloat16).float()), key
    with torch.inference_mode():
        torch.testing.assert_close(net.float()(input_ids=ids).logits[..., :model.n_classes], loaded(ids),
                                   atol=1e-5, rtol=0)


def test_auto_tokenizer_encodes_as_kd(model: CausalLM, spec: ModelSpec, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    lm_models.save(model, spec, tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    kd = hf.load_tokenizer(model.tokenizer_json, "kd")
    for text in PROMPTS:
        assert tok(text, add_special_tokens=False)["input_ids"] == kd.encode(text, add_special_tokens=False).ids
        assert tok(text)["input_ids"] == kd.encode(text).ids
        assert tok.decode(kd.encode(text).ids) == kd.decode(kd.encode(text).ids)
    assert tok.eos_token_id == tok.pad_token_id == spec.schema.text_info["eos_id"]
    assert tok.model_max_length == model.net.config.max_position_embeddings
    assert (tmp_path / "m" / "tokenizer.json").read_bytes() == model.tokenizer_json  # kd's bytes, unchanged


def test_pipeline_generates_text(model: CausalLM, spec: ModelSpec, tmp_path: Path) -> None:
    from transformers import pipeline

    lm_models.save(model, spec, tmp_path / "m")
    out = pipeline("text-generation", model=str(tmp_path / "m"), device="cpu")(
        PROMPTS[0], max_new_tokens=4, do_sample=False)
    text = out[0]["generated_text"]
    assert isinstance(text, str) and text.startswith(PROMPTS[0]) and len(text) > len(PROMPTS[0])


def old_layout(model: CausalLM, spec: ModelSpec, out: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A directory as save wrote it before save_pretrained: CausalLM's own names (`net.`), a tied head left out
    and recorded as an alias of the embedding in the header, config.json, tokenizer.json, model.json."""
    out.mkdir(parents=True)
    state = {k: v.detach().to(dtype).clone() for k, v in model.state_dict().items()}
    aliases = {"net.lm_head.weight": "net.model.embed_tokens.weight"} if tied(model.net) else {}
    save_file({k: v for k, v in state.items() if k not in aliases}, str(out / WEIGHTS_FILE), metadata=aliases or None)
    model.net.config.to_json_file(str(out / "config.json"))
    (out / "tokenizer.json").write_bytes(model.tokenizer_json)
    (out / "model.json").write_text(json.dumps(spec.to_json()))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_an_old_directory_still_loads_with_equal_logits(model: CausalLM, spec: ModelSpec, ids: torch.Tensor,
                                                        dtype: torch.dtype, tmp_path: Path) -> None:
    old = old_layout(model, spec, tmp_path / "old", dtype)
    with safe_open(str(old / WEIGHTS_FILE), "pt") as f:
        assert all(k.startswith("net.") for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)
    loaded, loaded_spec = lm_models.load(old)
    assert loaded_spec == spec and tied(loaded.net) == tied(model.net)
    for key, value in model.net.state_dict().items():  # the stored values: bf16 rounds them
        assert torch.equal(loaded.net.state_dict()[key], value.to(dtype).float()), key
    if dtype == torch.float32:
        with torch.inference_mode():
            assert torch.equal(loaded(ids), model(ids))


@pytest.mark.parametrize("layout", ["new", "old"])
def test_a_weight_under_a_wrong_name_is_a_one_line_error(model: CausalLM, spec: ModelSpec, layout: str,
                                                         tmp_path: Path) -> None:
    where = tmp_path / layout
    lm_models.save(model, spec, where) if layout == "new" else old_layout(model, spec, where)
    state = load_file(str(where / WEIGHTS_FILE))
    key = next(k for k in state if k.endswith("norm.weight"))
    state[key.replace("norm", "nrom")] = state.pop(key)
    save_file(state, str(where / WEIGHTS_FILE))
    with pytest.raises(UserError, match=r"model.safetensors does not match its config.json: missing \[.*norm.weight"
                                        r".*unexpected \[.*nrom") as err:
        lm_models.load(where)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("layout", ["new", "old"])
def test_adopting_a_kd_directory_keeps_its_weights_and_gives_a_hugging_face_one(
        model: CausalLM, spec: ModelSpec, layout: str, tmp_path: Path) -> None:
    """teacher.source: a kd lm directory. An old one is saved again in Hugging Face's layout, in bf16 as it was
    stored; either way the adopted teacher, and a student built from it, have its weights."""
    src = tmp_path / "src"
    if layout == "new":
        lm_models.save(model, spec, src, dtype=torch.bfloat16)
    else:
        old_layout(model, spec, src, torch.bfloat16)
    (tmp_path / "out").mkdir()
    task = LMTask()
    adopted = task.adopt(src, None, spec.schema, tmp_path / "out")  # type: ignore[arg-type]
    want = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    assert all(torch.equal(v, want[k]) for k, v in adopted.state_dict().items())
    assert {t.dtype for t in load_file(str(tmp_path / "out" / WEIGHTS_FILE)).values()} == {torch.bfloat16}
    assert {p.name for p in (tmp_path / "out").iterdir()} >= HF_FILES
    assert tied(hf_load(tmp_path / "out")) == tied(model.net)
    student = task.build(ModelSpec("layers", {"layers": [0, 3]}, spec.schema, "lm"), None, 0, tmp_path / "out")
    assert torch.equal(student.net.model.layers[1].mlp.down_proj.weight,
                       want["net.model.layers.3.mlp.down_proj.weight"])


def test_a_weight_of_another_shape_is_a_one_line_error(model: CausalLM, spec: ModelSpec, tmp_path: Path) -> None:
    lm_models.save(model, spec, tmp_path / "m")
    state = load_file(str(tmp_path / "m" / WEIGHTS_FILE))
    state["model.norm.weight"] = torch.ones(33)
    save_file(state, str(tmp_path / "m" / WEIGHTS_FILE))
    with pytest.raises(UserError, match=r"does not match its config.json: model.norm.weight is \[33\] in the file, "
                                        r"\[32\] by the config") as err:
        lm_models.load(tmp_path / "m")
    assert "\n" not in str(err.value)
