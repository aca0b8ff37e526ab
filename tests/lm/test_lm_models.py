"""Causal LMs (kd_core.tasks.lm.models) on the tiny Llama: what a teacher directory must hold, how students are
made from it, the tokenizer gate, padded vocabularies, and that a model directory gives back the same logits."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from kd_core.data import Schema
from kd_core.errors import UserError
from kd_core.models import ModelSpec
from kd_core.tasks._hf import encoder_layers, fingerprint, layer_subset
from kd_core.tasks.lm import models as lm_models
from kd_core.tasks.lm.data import LMInfo
from kd_core.tasks.lm.models import CausalLM
from tests.lm.conftest import build_llama, train_tokenizer, vocab_size


@pytest.fixture(scope="module")
def teacher(tiny_llama_dir: Path) -> nn.Module:
    return lm_models.load_source(tiny_llama_dir)


@pytest.fixture(scope="module")
def untied(tiny_llama_untied_dir: Path) -> nn.Module:
    return lm_models.load_source(tiny_llama_untied_dir)


@pytest.fixture(scope="module")
def n_tokens(lm_tokenizer_json: bytes) -> int:
    return vocab_size(lm_tokenizer_json)


@pytest.fixture(scope="module")
def spec(lm_tokenizer_json: bytes) -> ModelSpec:
    """The teacher's spec: classes are the tokens in id order, text the LMInfo of a 16-token packing."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_str(lm_tokenizer_json.decode()).get_vocab()
    info = LMInfo(seq_len=16, eos_id=vocab["<|endoftext|>"], vocab_size=len(vocab),
                  tokenizer_sha256=lm_models.tokenizer_sha256(lm_tokenizer_json), train_tokens=1000, test_tokens=200)
    return ModelSpec("teacher", {}, Schema(("text",), "next_token", tuple(sorted(vocab, key=vocab.get)),
                                           info.to_json()), "lm")


@pytest.fixture(scope="module")
def ids(n_tokens: int) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).integers(0, n_tokens, (3, 16)))  # (3, 16)


def states_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# --- the teacher's directory ----------------------------------------------------------------------------------

def test_load_source_reads_the_safetensors_in_float32(teacher: nn.Module, untied: nn.Module,
                                                      tiny_llama_dir: Path, tiny_llama_untied_dir: Path) -> None:
    for net, folder in ((teacher, tiny_llama_dir), (untied, tiny_llama_untied_dir)):
        assert not net.training and {p.dtype for p in net.parameters()} == {torch.float32}
        saved, state = load_file(str(folder / "model.safetensors")), net.state_dict()
        for key, value in saved.items():
            assert torch.equal(state[key], value), key
        assert net.config.num_hidden_layers == len(encoder_layers(net)) == 4
    assert shares_storage(teacher.lm_head.weight, teacher.model.embed_tokens.weight)
    assert not shares_storage(untied.lm_head.weight, untied.model.embed_tokens.weight)
    assert not torch.equal(untied.lm_head.weight, untied.model.embed_tokens.weight)
    assert torch.equal(untied.lm_head.weight, load_file(str(tiny_llama_untied_dir / "model.safetensors"))[
        "lm_head.weight"])


def copy_with_config(src: Path, dst: Path, **changes) -> Path:
    """The weights of `src` under a config.json with `changes`."""
    dst.mkdir()
    shutil.copy2(src / "model.safetensors", dst)
    config = json.loads((src / "config.json").read_text()) | changes
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_load_source_refuses_what_it_cannot_read_safely(tiny_llama_dir: Path, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy2(tiny_llama_dir / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded: a pickle could run code")
    with pytest.raises(UserError, match="no safetensors weights"):
        lm_models.load_source(pickled)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy2(tiny_llama_dir / "model.safetensors", bare)
    with pytest.raises(UserError, match="no config.json"):
        lm_models.load_source(bare)
    with pytest.raises(UserError, match=r"1 weights do not fit its config.json \(e.g. model.embed_tokens.weight: "
                                        r"\[384, 32\] in its safetensors, \[400, 32\] by its config\)"):
        lm_models.load_source(copy_with_config(tiny_llama_dir, tmp_path / "wider", vocab_size=400))
    with pytest.raises(UserError, match=r"1 weights are not in its safetensors \(e.g. lm_head.weight\)"):
        lm_models.load_source(copy_with_config(tiny_llama_dir, tmp_path / "untied", tie_word_embeddings=False))
    with pytest.raises(UserError, match="cannot load as a causal LM"):
        lm_models.load_source(copy_with_config(tiny_llama_dir, tmp_path / "unknown", model_type="no-such-model"))
    with pytest.raises(UserError, match="a model directory or a .gguf file"):
        lm_models.load_source(tiny_llama_dir / "config.json")


def test_resolve_source_and_its_tokenizer(tiny_llama_dir: Path, lm_tokenizer_json: bytes, tmp_path: Path) -> None:
    assert lm_models.resolve_source(str(tiny_llama_dir), Path("/")) == tiny_llama_dir
    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf/model-q8.gguf").write_bytes(b"GGUF")
    assert lm_models.resolve_source("gguf", tmp_path) == tmp_path / "gguf/model-q8.gguf"
    for source, problem in (("train", "distils a pretrained causal LM"), ("hf://org/model", "local Hugging Face"),
                            ("missing", "not found")):
        with pytest.raises(UserError, match=problem):
            lm_models.resolve_source(source, tmp_path)
    assert lm_models.source_tokenizer(tiny_llama_dir) == lm_tokenizer_json
    with pytest.raises(UserError, match="no tokenizer.json"):
        lm_models.source_tokenizer(tmp_path / "gguf")


# --- layer subset: the teacher's own layers -----------------------------------------------------------------

def test_layer_subset_keeps_the_chosen_layers(teacher: nn.Module) -> None:
    student = layer_subset(teacher, [0, 2, 3])
    kept, original = encoder_layers(student), encoder_layers(teacher)
    assert len(kept) == student.config.num_hidden_layers == 3
    assert len(original) == teacher.config.num_hidden_layers == 4  # the teacher is not cut down with it
    for layer, i in zip(kept, (0, 2, 3), strict=True):
        assert states_equal(layer, original[i])
    assert not states_equal(kept[1], original[1])  # layer 1 was dropped, not kept in place of 2
    assert [layer.self_attn.layer_idx for layer in kept] == [0, 1, 2]  # the KV cache's slots
    assert [layer.self_attn.layer_idx for layer in original] == [0, 1, 2, 3]
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        assert torch.equal(student.state_dict()[name], teacher.state_dict()[name])
    assert shares_storage(student.lm_head.weight, student.model.embed_tokens.weight)  # still tied


@pytest.mark.parametrize("layers", [[], [2, 0], [1, 1], [-1, 0], [0, 4]])
def test_layer_subset_refuses_bad_layer_lists(teacher: nn.Module, layers: list[int]) -> None:
    with pytest.raises(UserError, match=r"student.options.layers .*layer numbers in 0..3"):
        layer_subset(teacher, layers)


def greedy_without_cache(model: CausalLM, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding by re-reading the whole sequence each step: what the KV cache must reproduce."""
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_generate_on_a_layer_subset_matches_greedy_decoding(teacher: nn.Module, n_tokens: int,
                                                            lm_tokenizer_json: bytes) -> None:
    model = CausalLM(layer_subset(teacher, [1, 3]), n_tokens, lm_tokenizer_json).eval()
    prompt = [17, 200, 33, 95, 4]
    out = lm_models.generate(model, prompt, 12)
    assert len(out) == 12 and all(isinstance(t, int) and 0 <= t < n_tokens for t in out)
    assert out == greedy_without_cache(model, prompt, 12)
    eos = out[3]  # a token it produces: generation stops there, the end-of-text token included
    assert lm_models.generate(model, prompt, 12, eos_id=eos) == out[:out.index(eos) + 1]


def padded_model(teacher: nn.Module, n_tokens: int, extra: int = 8) -> nn.Module:
    """The teacher with `extra` embedding rows beyond the tokenizer (Qwen-style), whose logits would win."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(teacher.config)
    config.vocab_size = n_tokens + extra
    net = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = teacher.state_dict()
    with torch.no_grad():
        for key, value in net.state_dict().items():
            value.copy_(state[key] if state[key].shape == value.shape else torch.cat(
                [state[key], 3 * state[key][:extra]]))  # padded rows: large copies of real ones
    return net


def test_causal_lm_drops_the_padded_logits(teacher: nn.Module, n_tokens: int, lm_tokenizer_json: bytes,
                                           ids: torch.Tensor) -> None:
    net = padded_model(teacher, n_tokens)
    model = CausalLM(net, n_tokens, lm_tokenizer_json)
    with torch.inference_mode():
        logits, full = model(ids), net(input_ids=ids).logits
    assert logits.shape == (3, 16, n_tokens) and full.shape == (3, 16, n_tokens + 8)
    torch.testing.assert_close(logits, full[..., :n_tokens])
    assert (full.argmax(-1) >= n_tokens).any()  # the padded rows would win: dropping them matters
    out = lm_models.generate(model, [17, 200, 33], 10)
    assert len(out) == 10 and out == greedy_without_cache(model, [17, 200, 33], 10)  # argmax over real tokens


def test_check_vocab_needs_every_token(teacher: nn.Module, n_tokens: int) -> None:
    lm_models.check_vocab(teacher, n_tokens, "teacher")
    lm_models.check_vocab(padded_model(teacher, n_tokens), n_tokens, "padded")
    with pytest.raises(UserError, match=rf"student: {n_tokens} output logits, the teacher's tokenizer has "
                                        rf"{n_tokens + 1} tokens"):
        lm_models.check_vocab(teacher, n_tokens + 1, "student")


# --- the tokenizer gate ----------------------------------------------------------------------------------------

def test_check_same_tokenizer(lm_tokenizer_json: bytes) -> None:
    reformatted = json.dumps(json.loads(lm_tokenizer_json), indent=2).encode()  # same tokenizer, other bytes
    assert reformatted != lm_tokenizer_json
    lm_models.check_same_tokenizer(lm_tokenizer_json, lm_tokenizer_json, "student")
    lm_models.check_same_tokenizer(reformatted, lm_tokenizer_json, "student")
    with pytest.raises(UserError, match=r"student: its tokenizer differs from the teacher's in vocab "
                                        r"\(300 vs 384 tokens; first difference: .* id \d+\)"):
        lm_models.check_same_tokenizer(train_tokenizer(300), lm_tokenizer_json, "student")


def test_tokenizer_sha256_is_the_tokenizers_identity(lm_tokenizer_json: bytes) -> None:
    sha = lm_models.tokenizer_sha256(lm_tokenizer_json)
    assert len(sha) == 64 and sha == lm_models.tokenizer_sha256(lm_tokenizer_json)
    assert sha == lm_models.tokenizer_sha256(json.dumps(json.loads(lm_tokenizer_json)).encode())
    assert sha == lm_models.tokenizer_sha256(train_tokenizer())  # trained again: the same tokenizer
    assert sha != lm_models.tokenizer_sha256(train_tokenizer(300))
    with_bos = json.loads(lm_tokenizer_json)
    with_bos["added_tokens"].append({**with_bos["added_tokens"][0], "id": 384, "content": "<|im_start|>"})
    assert sha != lm_models.tokenizer_sha256(json.dumps(with_bos).encode())


# --- narrow: PCA-initialised embeddings -------------------------------------------------------------------------

def with_spectrum(source: nn.Module, seed: int = 0) -> nn.Module:
    """The source with input embeddings of well-separated singular values, so the principal directions are
    well defined (random init has near-ties, whose directions float32 and float64 SVDs may pick differently)."""
    out = copy.deepcopy(source)
    emb = out.get_input_embeddings().weight  # (V, H)
    v, h = emb.shape
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(v, h)))  # (V, H) orthonormal columns
    w, _ = np.linalg.qr(rng.normal(size=(h, h)))  # (H, H)
    s = np.geomspace(5.0, 0.05, h)  # (H,)
    with torch.no_grad():
        emb.copy_(torch.from_numpy(u * s @ w.T + rng.normal(size=h)).float())  # plus an offset the PCA centres away
    return out


def pca(emb: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The centred embeddings projected on their top `width` right singular vectors, and those vectors,
    in float64.  # (V, width), (H, width)"""
    centred = emb - emb.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return centred @ vt[:width].T, vt[:width].T


def column_signs(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Each column of `got` is ± that of `want` (SVD signs are arbitrary); the signs.  # (width,)"""
    signs = np.sign((got * want).sum(axis=0))
    err = np.abs(got - want * signs).max(axis=0)
    assert (err < 1e-4).all(), err
    return signs


@pytest.mark.parametrize("tied", [True, False])
def test_narrow_embeddings_are_the_teachers_principal_components(teacher: nn.Module, untied: nn.Module,
                                                                 tied: bool) -> None:
    src = with_spectrum(teacher if tied else untied)
    student = lm_models.narrow(src, seed=0, hidden=16, layers=2, heads=2, kv_heads=1, intermediate=32)
    emb = student.get_input_embeddings().weight.detach().double().numpy()  # (V, 16)
    want, directions = pca(src.get_input_embeddings().weight.detach().double().numpy(), 16)
    assert emb.shape == want.shape == (src.config.vocab_size, 16)
    signs = column_signs(emb, want)
    head = student.get_output_embeddings().weight
    if tied:
        assert shares_storage(head, student.get_input_embeddings().weight)
    else:  # the teacher's own head, on the same directions (same signs) as the embeddings
        assert not shares_storage(head, student.get_input_embeddings().weight)
        src_head = src.get_output_embeddings().weight.detach().double().numpy()  # (V, 32)
        assert not np.allclose(src_head, src.get_input_embeddings().weight.detach().double().numpy())
        np.testing.assert_allclose(head.detach().double().numpy(), src_head @ directions * signs, atol=1e-5)
    c = student.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.head_dim,
            c.intermediate_size, c.tie_word_embeddings) == (16, 2, 2, 1, 8, 32, tied)
    assert student.model.layers[0].self_attn.q_proj.weight.shape == (16, 16)
    assert student.model.layers[0].self_attn.k_proj.weight.shape == (8, 16)


def test_narrow_is_seeded_and_refuses_bad_shapes(teacher: nn.Module, ids: torch.Tensor, n_tokens: int) -> None:
    a, b = (lm_models.narrow(teacher, seed=3, hidden=16, layers=1, heads=2, intermediate=32) for _ in range(2))
    assert states_equal(a, b)
    with torch.inference_mode():
        assert CausalLM(a, n_tokens, b"").eval()(ids).shape == (3, 16, n_tokens)
    for options in ({"hidden": 64, "heads": 4}, {"hidden": 15, "heads": 2}, {"hidden": 16, "heads": 4, "kv_heads": 3}):
        with pytest.raises(UserError, match="student.options: hidden"):
            lm_models.narrow(teacher, seed=0, **options)


def test_from_config_dir(tiny_llama_dir: Path, tmp_path: Path) -> None:
    a, b = (lm_models.from_config_dir(tiny_llama_dir, seed=5) for _ in range(2))
    assert states_equal(a, b) and a.config.num_hidden_layers == 4
    with pytest.raises(UserError, match="not a Hugging Face config directory"):
        lm_models.from_config_dir(tmp_path, seed=0)


# --- the model directory -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["tied", "untied", "layers"])
def test_save_load_gives_the_same_logits(teacher: nn.Module, untied: nn.Module, spec: ModelSpec, n_tokens: int,
                                         lm_tokenizer_json: bytes, ids: torch.Tensor, tmp_path: Path,
                                         kind: str) -> None:
    net = {"tied": teacher, "untied": untied, "layers": layer_subset(teacher, [1, 2])}[kind]
    model = CausalLM(net, n_tokens, lm_tokenizer_json).eval()
    lm_models.save(model, spec, tmp_path / "m")
    loaded, loaded_spec = lm_models.load(tmp_path / "m")
    assert loaded_spec == spec and loaded.n_classes == n_tokens and not loaded.training
    assert loaded.tokenizer_json == lm_tokenizer_json
    with torch.inference_mode():
        assert torch.equal(loaded(ids), model(ids))
    stored = load_file(str(tmp_path / "m/model.safetensors"))
    emb, head = loaded.net.model.embed_tokens.weight, loaded.net.lm_head.weight
    assert shares_storage(emb, head) == (kind != "untied")  # a tied model stays tied
    assert ("lm_head.weight" in stored) == (kind == "untied")  # tied weights are stored once
    assert loaded.net.config.num_hidden_layers == (2 if kind == "layers" else 4)


def test_bf16_copy_loads_close_to_float32(teacher: nn.Module, spec: ModelSpec, n_tokens: int,
                                          lm_tokenizer_json: bytes, ids: torch.Tensor, tmp_path: Path) -> None:
    model = CausalLM(teacher, n_tokens, lm_tokenizer_json).eval()
    lm_models.save(model, spec, tmp_path / "f32")
    lm_models.save(model, spec, tmp_path / "bf16", dtype=torch.bfloat16)
    assert {t.dtype for t in load_file(str(tmp_path / "bf16/model.safetensors")).values()} == {torch.bfloat16}
    size = {d: (tmp_path / d / "model.safetensors").stat().st_size for d in ("f32", "bf16")}
    assert size["bf16"] < 0.6 * size["f32"]
    loaded, _ = lm_models.load(tmp_path / "bf16")
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    with torch.inference_mode():
        got, want = loaded(ids), model(ids)
    assert not torch.equal(got, want)  # rounded …
    torch.testing.assert_close(got, want, atol=0.02 * float(want.abs().max()), rtol=0)  # … but close
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9


def test_fingerprint_follows_the_weights(teacher: nn.Module, spec: ModelSpec, n_tokens: int,
                                         lm_tokenizer_json: bytes, tmp_path: Path) -> None:
    model = CausalLM(copy.deepcopy(teacher), n_tokens, lm_tokenizer_json)
    lm_models.save(model, spec, tmp_path / "a")
    lm_models.save(model, spec, tmp_path / "b")
    fp = fingerprint(tmp_path / "a")
    assert len(fp) == 64 and fp == fingerprint(tmp_path / "b") == fingerprint(tmp_path / "a")
    with torch.no_grad():
        model.net.model.norm.weight[0] += 1e-3
    lm_models.save(model, spec, tmp_path / "c")
    assert fingerprint(tmp_path / "c") != fp


def test_load_refuses_a_directory_that_is_not_a_kd_lm_model(tiny_llama_dir: Path) -> None:
    with pytest.raises(UserError, match=r"not a kd lm model directory \(missing model.json\)"):
        lm_models.load(tiny_llama_dir)


def test_padded_teacher_directory_loads(tmp_path: Path, lm_tokenizer_json: bytes, n_tokens: int) -> None:
    net = lm_models.load_source(build_llama(tmp_path / "padded", lm_tokenizer_json, vocab=n_tokens + 16))
    assert net.get_output_embeddings().weight.shape[0] == n_tokens + 16
    lm_models.check_vocab(net, n_tokens, "teacher")


# --- LMTask.metrics: the Task protocol's per-model metrics, from next-token logits -----------------------------

def test_lm_task_metrics_agree_with_the_evaluate_stage(teacher: nn.Module, spec: ModelSpec, n_tokens: int,
                                                        lm_tokenizer_json: bytes, ids: torch.Tensor,
                                                        tmp_path: Path) -> None:
    """`metrics` on the running sums of predict_logits gives every metric the stage's lm_metrics gives, but
    the two that need more than next-token logits (the teacher's whole distribution; timed generation),
    with its numbers."""
    from kd_core.evaluate import Scores
    from kd_core.tasks.lm import LMTask
    from kd_core.tasks.lm import scoring as lm_eval

    task = LMTask()
    models = {"teacher": CausalLM(teacher, n_tokens, lm_tokenizer_json).eval(),
              "student": CausalLM(layer_subset(teacher, [0, 3]), n_tokens, lm_tokenizer_json).eval()}
    weights = {}
    for role, model in models.items():
        lm_models.save(model, spec, tmp_path / role)
        weights[role] = tmp_path / role / "model.safetensors"
    x = ids.numpy()  # (3, 16)
    y = np.random.default_rng(1).integers(0, n_tokens, x.shape)  # (3, 16) next tokens
    latency = {"teacher": 2.0, "student": 1.0}
    want = lm_eval.lm_metrics(models, {r: task.example(spec) for r in models}, x, y, weights, latency,
                              spec.schema.text_info["eos_id"])
    logits = {r: task.predict_logits(m, x) for r, m in models.items()}  # (48, C)
    assert logits["teacher"].shape == (x.size, n_tokens)
    teacher_pred = logits["teacher"].argmax(1)
    for role, model in models.items():
        scores = Scores(n_tokens)
        scores.add(logits[role], y.reshape(-1), teacher_pred)  # position t of sequence i is row i·L + t
        got = task.metrics(model, spec, scores, weights[role], latency[role])
        assert set(got) == set(lm_eval.METRICS) - {"kl_to_teacher", "tokens_per_s"}
        for key, value in got.items():
            assert value == pytest.approx(want[role][key], rel=1e-5, abs=1e-6), (role, key)
    assert want["teacher"]["agreement_with_teacher"] == 1.0 and list(want["teacher"]) == list(lm_eval.METRICS)
