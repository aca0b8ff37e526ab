"""The model card of `task: lm`: perplexity table, sample completions of teacher, student and
text-only twin on the same prompts, what the cache cost per token, the export, the promotion decision
and the learning curves — every number read from the run's own files, as for classifiers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kd_core import data, tasks
from kd_core.card import gather
from kd_core.card.content import (
    FIGURES,
    HTML_FILE,
    MD_FILE,
    decision_blocks,
    int8_recipe,
    int8_verdict,
    registry_line,
    reproduce_blocks,
    table,
    validation_table,
)
from kd_core.card.figures import fig_training_curves
from kd_core.card.render import Block, Bullets, Heading, Image, Para, Table, to_html, to_markdown
from kd_core.config import Params
from kd_core.metrics_table import ROLES, export_table, headline, models_table
from kd_core.stages._registered import REGISTER_FILE
from kd_core.tasks._hf import load_tokenizer
from kd_core.tasks.lm import models as lm_models

SAMPLES, PROMPT_TOKENS, NEW_TOKENS = 3, 16, 24  # prompts: the start of held-out sequences


@dataclass(frozen=True)
class LMCardInputs:
    evals: dict  # metrics/eval.json
    curves: dict[str, list[dict[str, float]]]  # role -> per-epoch rows of metrics/train_<role>.csv
    samples: list[dict[str, str]]  # per prompt: {"prompt": ..., role: completion}
    cache: dict  # the logit cache's manifest (bytes_per_row, top_k, rows, index_dtype, capture)
    row: str
    split_rows: dict[str, int]
    validation: dict
    register: dict | None = None
    export: dict | None = None
    facts: dict[str, str] = field(default_factory=dict)


def sample_completions(model_dirs: dict[str, Path], splits: data.Splits) -> list[dict[str, str]]:
    """Greedy completions of the same prompts by each model (the starts of the first held-out sequences)."""
    task, schema = tasks.get("lm"), splits.schema
    loaded = {r: lm_models.load(d)[0] for r, d in model_dirs.items()}
    tok = load_tokenizer(next(iter(loaded.values())).tokenizer_json, "tokenizer.json")
    eos = schema.text_info["eos_id"]
    x = task.inputs(splits.test, schema)[:SAMPLES, :PROMPT_TOKENS]  # (S, P)
    out = []
    for ids in x.tolist():
        row = {"prompt": tok.decode([t for t in ids if t != eos])}
        for role, model in loaded.items():
            row[role] = tok.decode([t for t in lm_models.generate(model, ids, NEW_TOKENS, eos_id=eos) if t != eos])
        out.append(row)
    return out


def _one_line(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return (flat[:limit] + "…") if len(flat) > limit else flat


def _kept(c: dict) -> str:
    """What a cache row holds, in words (manifest keys: top_k, top_p, sampling)."""
    k, p, drawn = int(c.get("top_k") or 0), c.get("top_p"), c.get("sampling")
    head = f"the top {k - (drawn or 0)}" + (f" (fewer where they reach p = {p})" if p is not None else "")
    if drawn:
        return f"{head} next-token logits + {drawn} classes drawn from the rest with unbiased weights"
    return f"{head} next-token logits + the tail's exact mass"


def _summary(inp: LMCardInputs) -> list[str]:
    items = [headline(inp.evals) + "."]
    c = inp.cache
    if c:
        compact = ", compact: 8-bit log-probs + zstd" if c.get("encoding") == "compact" else ""
        items.append(f"The teacher ran once: {c.get('rows', 0):,} token positions cached as {_kept(c)}, "
                     f"**{c.get('bytes_per_row')} bytes per token** ({c.get('index_dtype')} indices, "
                     f"{c.get('dtype')} values{compact}).")
    if inp.export and "onnx_int8" in inp.export.get("student", {}):
        q = inp.export["student"]["onnx_int8"]
        items.append(f"Edge: int8 ONNX student {q['size_bytes'] / 2**20:.1f} MiB, perplexity {q['perplexity']:.2f} "
                     f"(PyTorch {inp.export['student']['pytorch']['perplexity']:.2f}), same next token as the fp32 "
                     f"student at {q.get('agreement_with_pytorch', 0) * 100:.1f} % of positions; "
                     f"{int8_recipe(inp.export)}{int8_verdict(inp.export)}.")
    if "chosen by" in inp.facts.get("distill", ""):
        items.append(f"Distillation setting {inp.facts['distill'].split(': chosen by')[0]}, chosen on held-out "
                     "sequences by `distill.search` (the trials are under Configuration).")
    if inp.register:
        items.append(registry_line(inp.register))
    return items


def build_blocks(inp: LMCardInputs, figures: dict[str, str], data_docs: str | None,
                 docs_pages: dict[str, str]) -> list[Block]:
    reg, f = inp.register, inp.facts
    title = f"Model card: {reg['model_name']} version {reg['version']}" if reg else "Model card: kd student"
    blocks: list[Block] = [
        Heading(title, 1),
        Para(f"Generated {f.get('generated', '')} by `kd stage report` from git commit `{f.get('git_commit', '?')}`. "
             "Every number below is read from `metrics/eval.json`, `metrics/export.json`, "
             "`metrics/register.json`, `metrics/train_*.csv` and the logit cache's manifest of the same run."),
        Heading("Summary"), Bullets(_summary(inp)),
        Heading("Intended use"),
        Para(f"Continues text like the training documents ({f.get('source', '?')}); a row is {inp.row}. Student "
             f"`{f.get('student', '?')}` distilled token by token from `{f.get('teacher', '?')}` on "
             f"{inp.split_rows.get('train', 0):,} training sequences. Serve the registered model with MLflow "
             "(prompts in, greedy completions out; `max_new_tokens` as a parameter) or the ONNX files (token ids "
             "in, next-token logits out)."),
        Heading("Limitations"),
        Bullets([f"Perplexity is measured on {inp.split_rows.get('test', 0):,} held-out sequences of documents the "
                 "student never saw, from the same source; other text is out of scope.",
                 "Greedy completions show what the model finds likely, not that it is right; it can state "
                 "falsehoods fluently.",
                 f"Latencies are CPU medians on the machine that ran the pipeline ({f.get('threads', '?')} threads)."]),
        Heading("Metrics on held-out documents"), table(models_table(inp.evals, inp.export)),
        Heading("Sample completions"),
        Para(f"The first {PROMPT_TOKENS} tokens of held-out sequences, continued greedily for {NEW_TOKENS} tokens "
             "by each model."),
        Table(["prompt", *ROLES], [[_one_line(s["prompt"]), *(_one_line(s.get(r, "")) for r in ROLES)]
                                   for s in inp.samples]),
    ]
    if inp.export:
        blocks += [Heading("Edge export (ONNX)"),
                   Para(f"The student exported to ONNX (fp32) and quantized to int8 ({int8_recipe(inp.export)}), "
                        "each checked against PyTorch on the held-out sequences, position by position."),
                   table(export_table(inp.export))]
    blocks += decision_blocks(reg)
    blocks += [
        Heading("Training curves"),
        Image(figures["training"], f"Loss and next-token accuracy per epoch: student (KD loss: {f.get('loss', '?')}) "
                                   "against the text-only twin; dotted: held-out validation sequences."),
        Heading("Data and validation"), validation_table(inp.validation, docs_pages),
        Para(f"Great Expectations Data Docs: [{data_docs}]({data_docs}); raw results in `reports/validation/`."
             if data_docs else "Raw Great Expectations results are in `reports/validation/`."),
        Heading("Configuration"),
        Bullets([f"`{k}`: {v}" for k, v in f.items() if k.startswith(("teacher", "student", "distill", "train",
                                                                         "cache", "data"))]),
        Heading("Reproduce"), *reproduce_blocks(f.get("git_commit", "<commit>"), reg),
    ]
    return blocks


def write_card(inp: LMCardInputs, out: Path, data_docs: str | None = None) -> dict[str, Path]:
    fig_dir = out / FIGURES
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures = {"training": fig_training_curves(inp.curves, fig_dir / "training_curves.png", inp.facts.get("loss", "?"))}
    docs = out / Path(data_docs).parent if data_docs else None
    pages = {p.stem: p.relative_to(out).as_posix() for p in sorted(docs.glob("validations/**/*.html"))} if docs else {}
    blocks = build_blocks(inp, {k: f"{FIGURES}/{v}" for k, v in figures.items()}, data_docs, pages)
    (out / MD_FILE).write_text(to_markdown(blocks))
    assert isinstance(blocks[0], Heading)  # the title
    (out / HTML_FILE).write_text(to_html(blocks, blocks[0].text, out))
    return {"markdown": out / MD_FILE, "html": out / HTML_FILE, **{k: fig_dir / v for k, v in figures.items()}}


def manifest(logits_dir: Path) -> dict:
    path = logits_dir / "manifest.json"
    if not path.is_file():
        return {}
    m = json.loads(path.read_text())
    keys = ("rows", "top_k", "top_p", "sampling", "encoding", "bytes_per_row", "index_dtype", "dtype", "capture")
    return {k: m.get(k) for k in keys}


def run_card(params: Params, workdir: Path, out: Path, data_docs: str) -> dict[str, Path]:
    """The lm card of the run in `workdir`: the files every card reads, plus sample completions and the
    cache's cost per token (no classes, so no confusion or calibration figures)."""
    metrics = workdir / params.paths.metrics
    splits = data.read_prepared(workdir / params.paths.prepared)
    inputs = LMCardInputs(
        evals=gather.evals(params, workdir), curves=gather.curves(params, workdir),
        samples=sample_completions(gather.model_dirs(params, workdir), splits),
        cache=manifest(workdir / params.paths.logits),
        row=tasks.for_params(params).describe(splits.schema),
        split_rows={"train": len(splits.train), "test": len(splits.test)},
        validation=gather.validation_summary(params, workdir),
        register=gather.read_json(metrics / REGISTER_FILE), export=gather.read_json(metrics / gather.EXPORT_FILE),
        facts=gather.facts(params, workdir))
    return write_card(inputs, out, data_docs=data_docs)
