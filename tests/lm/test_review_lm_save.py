"""lm model directories keep tied weights tied and store each weight once, and a weight that merely shares
storage with another (a slice of a fused tensor) is stored as itself; directories written before the aliases
were recorded (kd's own `net.` names) still load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from kd_core.data import Schema
from kd_core.models import WEIGHTS_FILE, ModelSpec
from kd_core.tasks.lm import models as lm_models
from kd_core.tasks.lm.data import LMInfo
from kd_core.tasks.lm.models import CausalLM
from tests.lm.conftest import vocab_size

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"  # Hugging Face's names, as save_pretrained writes


@pytest.fixture(scope="module")
def spec(lm_tokenizer_json: bytes) -> ModelSpec:
    n = vocab_size(lm_tokenizer_json)
    info = LMInfo(16, 0, n, lm_models.tokenizer_sha256(lm_tokenizer_json), 100, 100)
    return ModelSpec("teacher", {}, Schema(("text",), "", tuple(f"t{i}" for i in range(n)), info.to_json()), "lm")


@pytest.fixture
def model(tiny_llama_dir: Path, lm_tokenizer_json: bytes) -> CausalLM:
    return CausalLM(lm_models.load_source(tiny_llama_dir), vocab_size(lm_tokenizer_json), lm_tokenizer_json).eval()


def ids(model: CausalLM) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(1).integers(0, model.n_classes, (2, 16)))  # (2, 16)


def tied(m: CausalLM) -> bool:
    emb, head = m.net.model.embed_tokens.weight, m.net.lm_head.weight
    return emb.untyped_storage().data_ptr() == head.untyped_storage().data_ptr()


def test_a_tied_model_round_trips_tied_with_equal_logits(model: CausalLM, spec: ModelSpec, tmp_path: Path) -> None:
    assert tied(model)
    lm_models.save(model, spec, tmp_path / "m")
    loaded, _ = lm_models.load(tmp_path / "m")
    assert tied(loaded)
    with torch.inference_mode():
        assert torch.equal(loaded(ids(model)), model(ids(model)))
    stored = load_file(str(tmp_path / "m" / WEIGHTS_FILE))
    assert EMB in stored and HEAD not in stored  # once, under the embedding's name
    with torch.no_grad():  # still one tensor after loading: training the embedding trains the head
        loaded.net.model.embed_tokens.weight[0, 0] += 1.0
    assert torch.equal(loaded.net.lm_head.weight, loaded.net.model.embed_tokens.weight)


def test_a_bf16_copy_of_a_tied_model_stays_tied(model: CausalLM, spec: ModelSpec, tmp_path: Path) -> None:
    lm_models.save(model, spec, tmp_path / "bf16", dtype=torch.bfloat16)
    stored = load_file(str(tmp_path / "bf16" / WEIGHTS_FILE))
    assert HEAD not in stored and stored[EMB].dtype == torch.bfloat16
    loaded, _ = lm_models.load(tmp_path / "bf16")
    assert tied(loaded) and loaded.net.lm_head.weight.dtype == torch.float32
    assert torch.equal(loaded.net.lm_head.weight, model.net.lm_head.weight.to(torch.bfloat16).float())


def test_weights_that_only_share_storage_are_each_stored(model: CausalLM, spec: ModelSpec, tmp_path: Path) -> None:
    """k and v of a layer as two halves of one fused tensor: the same storage, different weights. Telling
    aliases apart by storage pointer alone stored k for both, and the loaded model answered differently."""
    attn = model.net.model.layers[0].self_attn
    k, v = attn.k_proj.weight.detach(), attn.v_proj.weight.detach()
    assert k.shape == v.shape and not torch.equal(k, v)
    fused = torch.cat([k, v]).clone()  # (2·kv, hidden)
    attn.k_proj.weight, attn.v_proj.weight = nn.Parameter(fused[:len(k)]), nn.Parameter(fused[len(k):])
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
    lm_models.save(model, spec, tmp_path / "fused")
    loaded, _ = lm_models.load(tmp_path / "fused")
    got = loaded.net.model.layers[0].self_attn
    assert torch.equal(got.k_proj.weight, k) and torch.equal(got.v_proj.weight, v)
    with torch.inference_mode():
        assert torch.equal(loaded(ids(model)), model(ids(model)))
    assert tied(loaded)


def test_a_directory_written_before_aliases_were_recorded_loads(model: CausalLM, spec: ModelSpec,
                                                                tmp_path: Path) -> None:
    """The earliest layout: CausalLM's own names, the embedding stored, the head left out, no metadata."""
    lm_models.save(model, spec, tmp_path / "old")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "net." + HEAD}
    save_file(state, str(tmp_path / "old" / WEIGHTS_FILE))
    with safe_open(str(tmp_path / "old" / WEIGHTS_FILE), "pt") as f:
        assert not f.metadata() and "net." + HEAD not in f.keys()  # noqa: SIM118 (safe_open has no __contains__)
    loaded, _ = lm_models.load(tmp_path / "old")
    assert tied(loaded)
    with torch.inference_mode():
        assert torch.equal(loaded(ids(model)), model(ids(model)))


def test_a_file_that_does_not_fit_its_config_is_one_line(model: CausalLM, spec: ModelSpec, tmp_path: Path) -> None:
    lm_models.save(model, spec, tmp_path / "m")
    state = load_file(str(tmp_path / "m" / WEIGHTS_FILE))
    save_file({k: v for k, v in state.items() if "layers.3." not in k}, str(tmp_path / "m" / WEIGHTS_FILE))
    with pytest.raises(Exception, match=r"does not match its config.json: missing \[") as err:
        lm_models.load(tmp_path / "m")
    assert "\n" not in str(err.value)
    (tmp_path / "m" / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(Exception, match="not a valid safetensors file") as err:
        lm_models.load(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
