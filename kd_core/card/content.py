"""What the model card says, top to bottom, as blocks (kd_core.card.render) — every number read from
the run's own files (eval.json, export.json, register.json, the training curves), so the card agrees
with them to the digit. The metrics table is kd_core.metrics_table's, shared with the console.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from kd_core import data, search, tasks
from kd_core.card.figures import fig_accuracy_vs, fig_confusion, fig_reliability, fig_training_curves
from kd_core.card.render import Block, Bullets, Code, Heading, Image, Para, Table, to_html, to_markdown
from kd_core.config import Params
from kd_core.evaluate import ECE_BINS
from kd_core.metrics_table import ROLES, MetricsTable, export_table, kib, models_table, ms, pts, ratios

MD_FILE, HTML_FILE, FIGURES = "model_card.md", "model_card.html", "figures"
DATA_DOCS = "data_docs"  # Great Expectations Data Docs, built next to the card


@dataclass(frozen=True)
class CardInputs:
    """What the card shows; every field is read from the pipeline's own outputs."""

    evals: dict  # metrics/eval.json
    curves: dict[str, list[dict[str, float]]]  # role -> per-epoch rows of metrics/train_<role>.csv
    logits: dict[str, np.ndarray]  # role -> (N, K) test logits
    labels: np.ndarray  # (N,) class indices
    classes: tuple
    row: str  # what one input is (kd_core.tasks: Task.describe)
    split_rows: dict[str, int]
    validation: dict  # reports/validation/summary.json
    register: dict | None = None  # metrics/register.json
    export: dict | None = None  # metrics/export.json
    facts: dict[str, str] = field(default_factory=dict)  # config and provenance lines


def score_test_split(params: Params, model_dirs: dict[str, Path], prepared: Path
                     ) -> tuple[dict[str, np.ndarray], np.ndarray, data.Splits]:
    """Each model's logits (N, K) on the test split, and the class indices (N,)."""
    task = tasks.for_params(params)
    splits = data.read_prepared(prepared)
    x, y = task.inputs(splits.test, splits.schema), task.labels(splits.test, splits.schema)  # (N, ...), (N,)
    return {r: task.predict_logits(task.load(d)[0], x) for r, d in model_dirs.items()}, y, splits


_LOSSES = {"hinton": "KL·T² + CE", "dkd": "DKD (α·TCKD + β·NCKD)·T² + CE", "mse": "MSE on logits + CE",
           "mse_l2": "MSE on logits + λ‖w‖²", "reverse_kl": "reverse KL·T² + CE", "jsd": "generalized JSD(β)·T² + CE",
           "skew_kl": "skew KL·T² + CE",
           "dist": "DIST (β·inter + γ·intra Pearson)·T² + CE"}  # kd_core.losses, by `distill.loss`


def loss_label(params: Params) -> str:
    """The student's training loss as the card names it: `distill.loss` (a user's factory by its
    name), the top-k form a top-k cache gives `hinton`, and the feature hints."""
    d = params.distill
    label = ("top-k KL·T² (cached top-k + tail bucket) + CE" if params.cache.top_k and d.loss == "hinton"
             else _LOSSES.get(d.loss, d.loss))
    if d.features:
        label += f" + {len(d.features)} feature hint(s) ({', '.join(sorted({h.loss for h in d.features}))})"
    return label


def table(t: MetricsTable) -> Table:
    """A kd_core.metrics_table table as a card block: the same rows the console shows."""
    return Table(t.header, t.rows)


def per_class_blocks(evals: dict, classes: tuple, limit: int = 40) -> list[Block]:
    """Per-class accuracy per model; with many classes, the student's `limit` worst."""
    student = evals["student"].get("per_class_accuracy", {})
    names = [c for c in map(str, classes) if c in student]
    note: list[Block] = []
    if len(names) > limit:
        names = sorted(names, key=lambda c: student[c])[:limit]
        note = [Para(f"The student's {limit} least accurate of {len(classes)} classes; all are in eval.json.")]
    rows = [[c, *(f"{evals[r].get('per_class_accuracy', {}).get(c, float('nan')):.3f}" for r in ROLES)]
            for c in names]
    return [*note, Table(["class", *ROLES], rows)]


def _summary(inp: CardInputs) -> list[str]:
    t, b, s = (inp.evals[r] for r in ROLES)
    r = ratios(inp.evals)
    items = [
        f"The student reaches accuracy **{s['accuracy']:.3f}** on {inp.split_rows['test']:,} test rows: "
        f"{r.kept * 100:.1f} % of the teacher's {t['accuracy']:.3f} with 1/{r.macs:.1f} of its MACs, "
        f"{r.latency:.1f}× lower latency and {r.size:.1f}× smaller weights.",
        f"Distillation is worth **{r.gain * 100:+.1f} points** over the same network "
        f"trained on the labels alone (baseline {b['accuracy']:.3f}); calibration error (ECE) "
        f"{b['ece']:.3f} → {s['ece']:.3f}.",
    ]
    if inp.export and "onnx_int8" in inp.export.get("student", {}):
        q = inp.export["student"]["onnx_int8"]
        fp32 = inp.export["student"].get("onnx", {})
        items.append(f"Edge: the int8 ONNX student is {kib(q['size_bytes'])}, accuracy {q['accuracy']:.3f} "
                     f"({pts(-q['accuracy_drop'])} vs PyTorch), same class as the fp32 student on "
                     f"{q.get('agreement_with_pytorch', 0) * 100:.1f} % of the test rows, {ms(q['latency_ms_p50'])} "
                     f"per row with ONNX Runtime (fp32 ONNX: {kib(fp32.get('size_bytes', 0))}, "
                     f"{ms(fp32.get('latency_ms_p50', 0))}); {int8_recipe(inp.export)}{int8_verdict(inp.export)}.")
    if "chosen by" in inp.facts.get("distill", ""):
        items.append(f"Distillation setting {inp.facts['distill'].split(': chosen by')[0]}, chosen on held-out "
                     "labelled rows by `distill.search` (the trials are under Configuration).")
    if inp.register:
        items.append(registry_line(inp.register))
    return items


def setting_line(params: Params, student_dir: Path) -> str:
    """The distillation setting the student trained with; when distill.search chose it, among what
    and by how much on the validation rows (the configured setting is the first trial)."""
    record = search.read(student_dir)
    d = search.chosen_setting(params.distill, record)
    line = f"loss {d.loss}, temperature {d.temperature:g}, alpha {d.alpha:g}"
    if record is None:
        return line
    trials, won = record["trials"], record["trials"][record["chosen_index"]]
    tried = "; ".join(f"{t['label']} {t['val_accuracy']:.3f} (NLL {t['val_nll']:.3f}, {t.get('steps', '?')} steps)"
                      for t in trials)
    how = record.get("scored_by", "the validation rows")
    return (f"{line}: chosen by `distill.search` ({won['label']}: {record.get('decision', 'best score')}) among "
            f"{len(trials)} settings trained on the same budget from the same cache, scored on {how}: {tried}")


def int8_verdict(export: dict) -> str:
    """'' when the int8 file shipped; else why the policy kept it back (export.json's `int8_policy`)."""
    verdict = export.get("int8_policy", {})
    if verdict.get("decision") != "rejected":
        return ""
    failed = "; ".join(r for r in verdict.get("reasons", []) if r.endswith("fail"))
    return f". **The int8 policy rejected it and it is not shipped** ({failed}); the fp32 ONNX file is"


def int8_recipe(export: dict) -> str:
    """How the int8 file was made (export.json's `int8`): recipe, repairs, where it was chosen."""
    r = export.get("int8")
    if not r:
        return "ONNX Runtime dynamic quantization"
    kept = f", {', '.join(r['kept_float'])} kept in float" if r.get("kept_float") else ""
    how = "ONNX Runtime dynamic quantization" if r["method"] == "dynamic" else (
        f"static QDQ, {r['method']} calibration on {r['calibration_rows']:,} training rows, per-channel int8 "
        f"weights, {r.get('activations', 'uint8')} activations{kept}")
    qad = " after a quantization-aware fine-tune against the cached teacher" if r.get("source") == "qad" else ""
    return (f"{how}{qad}; chosen among {len(r['candidates'])} recipes by agreement with the fp32 student on "
            f"{r['selection_rows']:,} other training rows")


def decision_blocks(reg: dict | None) -> list[Block]:
    """The promotion decision, one line per rule (none before a registration)."""
    if not reg:
        return []
    return [Heading("Promotion decision"),
            Para(f"**{reg['decision']}**: one line per rule of `policy` in `params.yaml`."),
            Bullets([f"`{r}`" for r in reg["reasons"]])]


def registry_line(reg: dict) -> str:
    """The summary's line on the registration (metrics/register.json)."""
    return (f"Registry: `{reg['model_name']}` version {reg['version']} was **{reg['decision']}** "
            f"(aliases: {', '.join(reg['aliases']) or 'none'}).")


def build_blocks(inp: CardInputs, figures: dict[str, str], data_docs: str | None,
                 docs_pages: dict[str, str] | None = None, extra: list[Block] | None = None) -> list[Block]:
    """The card, top to bottom. `figures` maps a figure's role to its file relative to the card;
    `docs_pages` a validated table's name to its Data Docs page; `extra`: the task's own blocks, after
    the errors by class."""
    reg = inp.register
    title = (f"Model card: {reg['model_name']} version {reg['version']}" if reg else "Model card: kd student")
    f = inp.facts
    blocks: list[Block] = [
        Heading(title, 1),
        Para(f"Generated {f.get('generated', '')} by `kd stage report` from git commit `{f.get('git_commit', '?')}`. "
             "Every number below is read from `metrics/eval.json`, `metrics/export.json`, "
             "`metrics/register.json` and `metrics/train_*.csv` of the same run."),
        Heading("Summary"), Bullets(_summary(inp)),
        Heading("Intended use"),
        Para(f"Classifies {inp.row} "
             f"into one of {len(inp.classes)} classes ({', '.join(map(str, inp.classes[:12]))}"
             f"{', …' if len(inp.classes) > 12 else ''}). Student `{f.get('student', '?')}` distilled from teacher "
             f"`{f.get('teacher', '?')}` on {inp.split_rows.get('train', 0):,} labelled and "
             f"{inp.split_rows.get('transfer', 0):,} unlabelled rows ({f.get('source', '?')}). Serve the registered "
             "model with MLflow (it takes raw inputs and answers class names), or the ONNX files on an edge device "
             "(the model's inputs in, logits out)."),
        Heading("Limitations"),
        Bullets([
            f"Measured on one test split of {inp.split_rows['test']:,} rows from the same source as the training "
            "data; per-class accuracy is below. Rows unlike the training data are out of scope.",
            "Latencies are medians of single-row CPU inference on the machine that ran the pipeline "
            f"({f.get('threads', '?')} threads); re-measure on the target device.",
            "Probabilities are only as calibrated as the reliability diagrams show; do not read them as exact risks.",
        ]),
        Heading("Metrics on the test set"), table(models_table(inp.evals, inp.export)),
    ]
    if inp.export:
        blocks += [Heading("Edge export (ONNX)"),
                   Para("The student exported to ONNX (fp32) and quantized to int8 "
                        f"({int8_recipe(inp.export)}), each checked against PyTorch on the test rows. "
                        "Latencies are measured in one process, interleaved, so machine noise hits all alike; "
                        "the PyTorch rows are re-measured here and can differ from the table above by noise."),
                   table(export_table(inp.export))]
    blocks += decision_blocks(reg)
    blocks += [
        Heading("Training curves"),
        Image(figures["training"], f"Loss and accuracy per epoch: student (KD loss: {f.get('loss', '?')}) against "
                                   "the hard-label baseline (`metrics/train_*.csv`); dotted: held-out validation "
                                   "rows."),
        Heading("Accuracy against cost"),
        Image(figures["size"], "Test accuracy against weights file size (log scale)."),
        Image(figures["latency"], "Test accuracy against batch-1 CPU latency (log scale; int8 on ONNX Runtime)."),
        Heading("Calibration"),
        Image(figures["reliability"], f"Reliability diagrams ({ECE_BINS} equal-width confidence bins): bars "
                                        "on the diagonal are perfectly calibrated; ECE as in eval.json."),
        Heading("Errors by class"),
        Image(figures["confusion"], "Confusion matrices on the test set (rows: true class, normalised per row; "
                                    "numbers: rows)."),
        Heading("Per-class accuracy", 3),
        *per_class_blocks(inp.evals, inp.classes),
        *(extra or []),
        Heading("Data and validation"),
        validation_table(inp.validation, docs_pages or {}),
        Para(("Great Expectations Data Docs for these results: "
              f"[{data_docs}]({data_docs}) (its index draws the list with scripts from public CDNs; the pages "
              "linked in the table read offline too); raw results in `reports/validation/`.") if data_docs else
             "Raw Great Expectations results are in `reports/validation/`."),
        Heading("Configuration"),
        Bullets([f"`{k}`: {v}" for k, v in f.items() if k.startswith(("teacher", "student", "distill", "train",
                                                                         "cache", "data"))]),
        Heading("Reproduce"), *reproduce_blocks(f.get("git_commit", "<commit>"), reg),
    ]
    return blocks


def validation_table(summary: dict, docs_pages: dict[str, str]) -> Table:
    """Rows and expectations per validated table, each linked to its Data Docs page;
    `<split>_class_counts` is the check of rows per class."""
    rows = []
    for name, v in summary.get("splits", {}).items():
        base, per_class = name.removesuffix("_class_counts"), name.endswith("_class_counts")
        rows.append([f"{base}: rows per class" if per_class else name,
                     f"{v.get('rows', 0):,} {'classes' if per_class else ''}".strip(),
                     str(v.get("expectations", "")), str(v.get("failed_expectations", "")),
                     f"[results]({docs_pages[name]})" if name in docs_pages else "–"])
    return Table(["table", "rows", "expectations", "failed", "Data Docs"], rows)


def reproduce_blocks(commit: str, reg: dict | None) -> list[Block]:
    """The commands that bring back this run's exact outputs: code from git, hashes from the version's
    dvc.lock (logged to its MLflow run, since dvc.lock records outputs git does not hold)."""
    clean = commit.split("-dirty")[0]
    run = f"version {reg['version']}'s run" if reg else "the run"
    blocks: list[Block] = [Code(
        f"git checkout {clean}   # code and params\n"
        f"mlflow artifacts download -r <run_id> -a dvc.lock -d .   # <run_id>: {run} in MLflow\n"
        "dvc checkout        # data, soft labels and models from the DVC cache (or `dvc pull` from a remote)\n"
        "dvc repro --force   # or rebuild them: CPU training is seeded")]
    if "-dirty" in commit:
        blocks.insert(0, Para(f"Built from uncommitted changes (`-dirty{commit.split('-dirty')[1]}`) on top of "
                              "this commit: the checkout gives the commit, not the exact code."))
    return blocks


def write_card(inp: CardInputs, out: Path, data_docs: str | None = None,
               extra: Callable[[Path], tuple[list[Block], dict[str, Path]]] | None = None) -> dict[str, Path]:
    """Draw the figures into out/figures and write out/model_card.{md,html}; returns the written paths.
    `extra(figures folder)`: the task's own blocks (figures referenced as `figures/<name>`) and files."""
    fig_dir = out / FIGURES
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        "training": fig_training_curves(inp.curves, fig_dir / "training_curves.png", inp.facts.get("loss", "?")),
        "size": fig_accuracy_vs(inp.evals, inp.export, "size_bytes", "model file size (KiB)", 1 / 1024,
                                fig_dir / "accuracy_vs_size.png"),
        "latency": fig_accuracy_vs(inp.evals, inp.export, "latency_ms_p50", "latency p50 (ms, batch 1)", 1.0,
                                   fig_dir / "accuracy_vs_latency.png"),
        "reliability": fig_reliability({r: inp.logits[r] for r in ROLES}, inp.labels, fig_dir / "reliability.png"),
        "confusion": fig_confusion({r: inp.logits[r] for r in ROLES}, inp.labels, inp.classes,
                                   fig_dir / "confusion_matrices.png"),
    }
    docs = out / Path(data_docs).parent if data_docs else None  # GX writes validations/<suite>/…/<table>.html
    pages = {p.stem: p.relative_to(out).as_posix() for p in sorted(docs.glob("validations/**/*.html"))} if docs else {}
    own, own_files = extra(fig_dir) if extra is not None else ([], {})
    blocks = build_blocks(inp, {k: f"{FIGURES}/{v}" for k, v in figures.items()}, data_docs, pages, own)
    title = blocks[0].text if isinstance(blocks[0], Heading) else "Model card"
    (out / MD_FILE).write_text(to_markdown(blocks))
    (out / HTML_FILE).write_text(to_html(blocks, title, out))
    return {"markdown": out / MD_FILE, "html": out / HTML_FILE,
            **{k: fig_dir / v for k, v in figures.items()}, **own_files}


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
