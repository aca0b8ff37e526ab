"""`kd export --gguf`: a tiny random Llama written as f16 and q8_0 GGUF files reads back through transformers'
GGUF loader with the student's logits (Q/K in llama.cpp's rotary layout, undone by the loader), its
hyperparameters, tied or untied embeddings and its tokenizer; what the llama format cannot hold is one line."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, quants
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from kd_core import data, models, tasks
from kd_core.cli import app
from kd_core.errors import UserError
from kd_core.tasks._hf import load_tokenizer
from kd_core.tasks.lm import gguf
from kd_core.tasks.lm import models as lm_models
from kd_core.tasks.lm.data import DOC, IDS, LMInfo
from kd_core.tasks.lm.models import CausalLM
from tests.conftest import ROOT
from tests.lm.conftest import EOS, vocab_size

SEQ = 16
ROPE_THETA, EPS, CONTEXT = 100000.0, 1e-5, 64  # not LlamaConfig's defaults: the file must carry them


def student(blob: bytes, tied: bool = True, rows: int | None = None, intermediate: int = 64,
            **config: object) -> CausalLM:
    """A 2-layer Llama (hidden 32, GQA 4/2 heads) with weights large enough for logits of a few units."""
    n = vocab_size(blob)
    cfg = LlamaConfig(vocab_size=rows or n, hidden_size=32, intermediate_size=intermediate, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT,
                      tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
                      rms_norm_eps=EPS, **config)
    torch.manual_seed(0)
    net = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.15)
    return CausalLM(net, n, blob)


def held_out(n: int, count: int = 4) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(0).integers(0, n, (count, SEQ + 1))
    return ids[:, :-1], ids[:, 1:]  # (N, L) each


def logit_scale(model: CausalLM, x: np.ndarray) -> float:
    with torch.inference_mode():
        return float(model(torch.from_numpy(x)).abs().max())


# untied: a padded (Qwen-style) embedding, and an FFN width (48) no Q8_0 block row fits, which stays f16
CASES = {"tied": {"tied": True}, "untied-padded": {"tied": False, "rows": 400, "intermediate": 48}}


@pytest.mark.parametrize("case", CASES)
def test_f16_and_q8_0_read_back_as_the_student(case: str, tmp_path: Path, lm_tokenizer_json: bytes) -> None:
    opts = CASES[case]
    model = student(lm_tokenizer_json, **opts)
    x, y = held_out(model.n_classes)
    checks = gguf.export(model, tmp_path, x, y)
    scale = logit_scale(model, x)
    f16, q8 = checks["f16"], checks["q8_0"]
    assert scale > 1.0  # differences are measured on logits of a few units, not on near-zero ones
    assert f16.max_abs_logit_diff < 1e-2 * scale and q8.max_abs_logit_diff < 0.1 * scale
    assert f16.max_abs_logit_diff < q8.max_abs_logit_diff
    assert f16.perplexity == pytest.approx(f16.pytorch_perplexity, rel=1e-3)
    assert q8.perplexity == pytest.approx(q8.pytorch_perplexity, rel=2e-2)
    assert f16.tokenizer_round_trip and q8.tokenizer_round_trip
    assert q8.size_bytes < 0.7 * f16.size_bytes
    assert json.loads((tmp_path / gguf.REPORT_FILE).read_text())["q8_0"]["max_abs_logit_diff"] == q8.max_abs_logit_diff

    types = {fmt: {t.name: t.tensor_type for t in GGUFReader(tmp_path / c.file).tensors} for fmt, c in checks.items()}
    assert ("output.weight" in types["f16"]) is not opts["tied"]
    assert types["f16"]["blk.0.attn_q.weight"] == GGMLQuantizationType.F16
    assert types["f16"]["blk.1.ffn_norm.weight"] == types["q8_0"]["output_norm.weight"] == GGMLQuantizationType.F32
    assert types["q8_0"]["token_embd.weight"] == types["q8_0"]["blk.1.attn_k.weight"] == GGMLQuantizationType.Q8_0
    want_down = GGMLQuantizationType.F16 if opts.get("intermediate") == 48 else GGMLQuantizationType.Q8_0
    assert types["q8_0"]["blk.0.ffn_down.weight"] == want_down

    config = gguf.load(tmp_path / f16.file).config
    assert config.tie_word_embeddings is opts["tied"] and config.vocab_size == opts.get("rows", model.n_classes)
    assert config.rope_parameters["rope_theta"] == ROPE_THETA and config.rms_norm_eps == pytest.approx(EPS)
    assert (config.max_position_embeddings, config.num_key_value_heads, config.head_dim) == (CONTEXT, 2, 8)


def test_q8_0_is_the_student_with_its_weights_rounded_to_q8_0_blocks(tmp_path: Path, lm_tokenizer_json: bytes) -> None:
    """The q8_0 file's whole difference is Q8_0 rounding: the student with each quantized weight rounded
    the same way (gguf's own quantize / dequantize) gives its logits to float precision."""
    model = student(lm_tokenizer_json, intermediate=48)
    x, y = held_out(model.n_classes, 2)
    path = gguf.write(model, tmp_path / "s.gguf", "q8_0")
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.net.parameters():
            if p.ndim == 2 and p.shape[1] % 32 == 0:  # the permutation moves whole rows: blocks are unchanged
                q = quants.quantize(p.numpy(), GGMLQuantizationType.Q8_0)
                p.copy_(torch.from_numpy(quants.dequantize(q, GGMLQuantizationType.Q8_0)))
            elif p.ndim == 2:
                p.copy_(p.half().float())  # the f16 fallback
    loaded = CausalLM(gguf.load(path), model.n_classes, lm_tokenizer_json)
    with torch.inference_mode():
        got, want, raw = (m(torch.from_numpy(x)) for m in (loaded, rounded, model))
    assert float((got - want).abs().max()) < 1e-3 * float((got - raw).abs().max())


def test_the_rotary_permutation_is_what_makes_it_match(tmp_path: Path, lm_tokenizer_json: bytes,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Control: Q/K written in HF's layout (no permute) read back far off, so the check can fail."""
    model = student(lm_tokenizer_json)
    x, y = held_out(model.n_classes, 2)
    right = gguf.export(model, tmp_path / "right", x, y, formats=("f16",))["f16"]
    monkeypatch.setattr(gguf, "permute", lambda w, n_head: w)
    wrong = gguf.export(model, tmp_path / "wrong", x, y, formats=("f16",))["f16"]
    assert wrong.max_abs_logit_diff > 20 * right.max_abs_logit_diff


def test_tokenizer_metadata_and_round_trip(tmp_path: Path, lm_tokenizer_json: bytes) -> None:
    model = student(lm_tokenizer_json)
    path = gguf.write(model, tmp_path / "s.gguf", "f16", eos_id=0)
    fields = GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2" and fields["tokenizer.ggml.pre"].contents() == "gpt-2"
    assert fields["tokenizer.ggml.tokens"].contents(0) == EOS and fields["tokenizer.ggml.token_type"].contents(0) == 3
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 0
    assert not fields["tokenizer.ggml.add_bos_token"].contents()
    assert "tokenizer.ggml.bos_token_id" not in fields  # LlamaConfig's bos 1 is a byte here, not a special token
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    ours = load_tokenizer(lm_tokenizer_json, "test")
    text = f"Return the number of items, or None.\n  Second line {EOS} then more: déjà vu 123."
    ids = ours.encode(text, add_special_tokens=False).ids
    assert theirs(text, add_special_tokens=False)["input_ids"] == ids and 0 in ids
    assert theirs.decode(ids) == text


def test_pre_tokenizers_by_llama_cpp_name() -> None:
    """How text is split before BPE goes by llama.cpp's name; one it has no name for is refused."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    seq = lambda *steps: {"pre_tokenizer": {"type": "Sequence", "pretokenizers": list(steps)}}  # noqa: E731
    llama3 = {"type": "Split", "pattern": {"Regex": GGUF_PRE_TOKENIZER_SPLITS["llama3"]}, "behavior": "Isolated"}
    assert gguf._pre_tokenizer({"pre_tokenizer": byte_level}) == "gpt-2"
    assert gguf._pre_tokenizer(seq({"type": "Digits", "individual_digits": True}, byte_level)) == "smollm"
    assert gguf._pre_tokenizer(seq(llama3, {**byte_level, "use_regex": False})) == "llama3"
    with pytest.raises(UserError, match="Whitespace"):
        gguf._pre_tokenizer({"pre_tokenizer": {"type": "Whitespace"}})


def test_what_the_llama_format_cannot_hold_is_one_line(tmp_path: Path, lm_tokenizer_json: bytes) -> None:
    n = vocab_size(lm_tokenizer_json)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=n, n_embd=32, n_layer=1, n_head=2, n_positions=32, bos_token_id=0,
                                          eos_token_id=0))
    with pytest.raises(UserError, match="'gpt2' model") as err:
        gguf.write(CausalLM(gpt2, n, lm_tokenizer_json), tmp_path / "g.gguf", "f16")
    biased = student(lm_tokenizer_json, attention_bias=True)
    with pytest.raises(UserError, match="attention_bias") as err2:
        gguf.write(biased, tmp_path / "b.gguf", "q8_0")
    with pytest.raises(UserError, match="format 'q4_0'"):
        gguf.write(student(lm_tokenizer_json), tmp_path / "q.gguf", "q4_0")
    assert "\n" not in str(err.value) + str(err2.value) and not list(tmp_path.iterdir())


def lm_project(root: Path, blob: bytes) -> Path:
    """A project with the lm example's params, a prepared test split and a saved student (no DVC run)."""
    root.mkdir()
    shutil.copy2(ROOT / "examples/lm/params.yaml", root / "params.yaml")
    (root / "dvc.yaml").write_text("stages: {}\n")
    model = student(blob)
    n = model.n_classes
    info = LMInfo(SEQ, 0, n, lm_models.tokenizer_sha256(blob), 64, 64)
    schema = data.Schema(("text",), "", tuple(f"t{i}" for i in range(n)), info.to_json())
    ids = np.random.default_rng(1).integers(0, n, (12, SEQ + 1))
    frame = pd.DataFrame({IDS: list(ids), DOC: ["doc"] * len(ids)})
    data.write_prepared(data.Splits(frame.iloc[:2], frame, frame.iloc[:0], schema), root / "data/prepared")
    tasks.get("lm").save(model, models.ModelSpec("narrow", {}, schema, "lm"), root / "artifacts/student")
    return root


def test_kd_export_gguf(tmp_path: Path, lm_tokenizer_json: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    proj = lm_project(tmp_path / "lm", lm_tokenizer_json)
    monkeypatch.chdir(proj)
    res = CliRunner().invoke(app, ["export", "--gguf"], env={"COLUMNS": "160"})
    assert res.exit_code == 0, res.output + repr(res.exception)
    out = proj / "artifacts/gguf"
    report = json.loads((out / gguf.REPORT_FILE).read_text())
    assert sorted(p.name for p in out.iterdir()) == sorted([gguf.REPORT_FILE, *(v["file"] for v in report.values())])
    assert report["f16"]["file"] == "student.f16.gguf" and report["q8_0"]["file"] == "student.q8_0.gguf"
    assert report["q8_0"]["size_bytes"] == (out / "student.q8_0.gguf").stat().st_size
    assert "q8_0" in res.output and "max |Δlogit|" in res.output and "perplexity" in res.output


def test_kd_export_gguf_on_a_task_without_it_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tmp_path.joinpath("dvc.yaml").write_text("stages: {}\n")
    shutil.copy2(ROOT / "params.yaml", tmp_path / "params.yaml")  # the tabular example
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["export", "--gguf"])
    assert isinstance(res.exception, UserError) and "has no GGUF export" in str(res.exception)
    assert "\n" not in str(res.exception) and not (tmp_path / "artifacts").exists()


def test_kd_export_gguf_of_another_tokenizer_is_one_line(tmp_path: Path, lm_tokenizer_json: bytes,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A student of another tokenizer than the prepared data's (a registered version from before a teacher
    change) cannot be checked on today's ids: a one-line error, no files (not an IndexError)."""
    proj = lm_project(tmp_path / "lm", lm_tokenizer_json)
    schema_file = proj / "data/prepared" / data.SCHEMA_FILE
    schema = json.loads(schema_file.read_text())
    schema["text"]["tokenizer_sha256"] = "0" * 64
    schema_file.write_text(json.dumps(schema))
    monkeypatch.chdir(proj)
    res = CliRunner().invoke(app, ["export", "--gguf"])
    assert isinstance(res.exception, UserError) and "is not the prepared data's" in str(res.exception)
    assert "\n" not in str(res.exception) and not (proj / "artifacts/gguf").exists()
