"""The model card: measured tables and figures for one run, as Markdown and as self-contained HTML.

Every number comes from a file the pipeline wrote (metrics/eval.json, export.json, register.json,
the training curves, the validation summary) or is recomputed with the same function that wrote it
(kd_core.evaluate), so the card cannot drift from the record. Figures are drawn with matplotlib's
object API (no pyplot, no global backend) and saved as PNG files; the HTML embeds them as data URIs
so it renders anywhere, MLflow's artifact viewer included.
"""

from __future__ import annotations

import base64
import csv
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import FuncFormatter, NullFormatter
from matplotlib.transforms import Bbox

from kd_core import data, models
from kd_core.evaluate import ECE_BINS, ece, softmax

ROLES = ("teacher", "baseline", "student")  # card order: the reference, the control, the candidate
COLORS = {"teacher": "#4c72b0", "baseline": "#8c8c8c", "student": "#dd8452", "student int8": "#c44e52"}
MD_FILE, HTML_FILE, FIGURES = "model_card.md", "model_card.html", "figures"
DATA_DOCS = "data_docs"  # Great Expectations Data Docs, built next to the card
DPI = 110  # sharp on a laptop screen, ~50 KiB per figure


# --- the card as blocks, rendered twice ---------------------------------------------------------------

@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Para:
    text: str  # inline `code`, **bold** and [text](href) are rendered in both formats


@dataclass(frozen=True)
class Bullets:
    items: Sequence[str]


@dataclass(frozen=True)
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    align_right: bool = True  # numbers right-aligned; the first column stays left


@dataclass(frozen=True)
class Image:
    file: str  # relative to the card, e.g. figures/reliability.png
    caption: str
    half: bool = False  # HTML: two half-width figures share a row instead of leaving half the page blank


@dataclass(frozen=True)
class Code:
    text: str


Block = Heading | Para | Bullets | Table | Image | Code


def to_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {item}" for item in b.items))
        elif isinstance(b, Table):
            sep = ["---"] + [("---:" if b.align_right else "---")] * (len(b.header) - 1)
            lines = [b.header, sep, *b.rows]
            out.append("\n".join("| " + " | ".join(cells) + " |" for cells in lines))
        elif isinstance(b, Image):
            out.append(f"![{b.caption}]({b.file})\n\n*{b.caption}*")
        elif isinstance(b, Code):
            out.append(f"```bash\n{b.text}\n```")
    return "\n\n".join(out) + "\n"


_INLINE = [(re.compile(r"`([^`]+)`"), r"<code>\1</code>"),
           (re.compile(r"\*\*([^*]+)\*\*"), r"<strong>\1</strong>"),
           (re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)"), r'<a href="\2">\1</a>')]


def _inline(text: str) -> str:
    text = html.escape(text, quote=False)
    for pattern, repl in _INLINE:
        text = pattern.sub(repl, text)
    return text


_CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1000px;margin:2em auto;
padding:0 1.2em;color:#222}
h1{font-size:1.7em;border-bottom:2px solid #dd8452;padding-bottom:.2em}h2{margin-top:1.8em;font-size:1.3em}
table{border-collapse:collapse;margin:.6em 0}th,td{padding:.3em .7em;border-bottom:1px solid #ddd}
th{background:#f4f4f4;text-align:left;vertical-align:bottom}th.n{text-align:right}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}td:first-child{white-space:nowrap}
code{background:#f4f4f4;padding:0 .25em;border-radius:3px}pre{background:#f4f4f4;padding:.8em;overflow:auto}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
figure.half{display:inline-block;width:48.5%;margin:1em 0;vertical-align:top}figure.half+figure.half{margin-left:2%}
"""


def to_html(blocks: Sequence[Block], title: str, base: Path) -> str:
    """Self-contained HTML; figures (read from `base`/file) are embedded as PNG data URIs and keep
    their file name in `data-file`, so a reader (or a test) can tell which figure is which."""
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{_inline(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            out.append(f"<p>{_inline(b.text)}</p>")
        elif isinstance(b, Bullets):
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f'<th{" class=n" if b.align_right and j else ""}>{_inline(h)}</th>'
                           for j, h in enumerate(b.header))
            body = "".join("<tr>" + "".join(
                f'<td{" class=n" if b.align_right and j else ""}>{_inline(c)}</td>' for j, c in enumerate(row))
                + "</tr>" for row in b.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Image):
            png = base64.b64encode((base / b.file).read_bytes()).decode()
            out.append(f'<figure{" class=half" if b.half else ""}><img src="data:image/png;base64,{png}" '
                       f'data-file="{html.escape(b.file)}" '
                       f'alt="{html.escape(b.caption)}"><figcaption>{_inline(b.caption)}</figcaption></figure>')
        elif isinstance(b, Code):
            out.append(f"<pre><code>{html.escape(b.text)}</code></pre>")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


# --- inputs -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CardInputs:
    """What the card shows; every field is read from the pipeline's own outputs."""

    evals: dict  # metrics/eval.json
    curves: dict[str, list[dict[str, float]]]  # role -> per-epoch rows of metrics/train_<role>.csv
    logits: dict[str, np.ndarray]  # role -> (N, K) test logits
    labels: np.ndarray  # (N,) class indices
    classes: tuple
    features: tuple[str, ...]
    split_rows: dict[str, int]
    validation: dict  # reports/validation/summary.json
    register: dict | None = None  # metrics/register.json
    export: dict | None = None  # metrics/export.json
    facts: dict[str, str] = field(default_factory=dict)  # config and provenance lines


def read_curve(path: Path) -> list[dict[str, float]]:
    if not path.exists():
        return []
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def score_test_split(model_dirs: dict[str, Path], prepared: Path
                     ) -> tuple[dict[str, np.ndarray], np.ndarray, data.Splits]:
    """Each model's logits (N, K) on the test split, and the class indices (N,)."""
    splits = data.read_prepared(prepared)
    x = data.features_array(splits.test, splits.schema)  # (N, F)
    y = data.label_indices(splits.test, splits.schema)  # (N,)
    return {r: models.predict_logits(models.load(d)[0], x) for r, d in model_dirs.items()}, y, splits


# --- figures ------------------------------------------------------------------------------------------

def _save(fig: MplFigure, path: Path) -> str:
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata={"Software": None})  # no version: stable bytes
    return path.name


def fig_training_curves(curves: dict[str, list[dict[str, float]]], path: Path) -> str:
    """Loss and accuracy per epoch, x = share of training done (the baseline runs more, shorter epochs
    for the same number of optimiser steps). Held-out validation accuracy is drawn next to training
    accuracy because it is what picks the kept epoch, and the gap between them shows overfitting."""
    fig = MplFigure(figsize=(11, 3.8))
    ax_loss, ax_acc = fig.subplots(1, 2)
    labels = {"student": "student (KD loss: KL·T² + CE)", "baseline": "baseline (cross-entropy)"}
    drawn = False
    for role, rows in curves.items():
        if not rows:
            continue
        drawn = True
        t = np.array([r["epoch"] for r in rows]) / len(rows) * 100
        ax_loss.plot(t, [r["loss"] for r in rows], color=COLORS[role], label=labels.get(role, role))
        ax_acc.plot(t, [r["accuracy"] for r in rows], color=COLORS[role], label=f"{role}: train (labelled rows)")
        if "val_accuracy" in rows[0]:
            ax_acc.plot(t, [r["val_accuracy"] for r in rows], color=COLORS[role], linestyle=":", linewidth=2,
                        label=f"{role}: held-out validation")
        if "agreement_with_teacher" in rows[0]:
            ax_acc.plot(t, [r["agreement_with_teacher"] for r in rows], color=COLORS[role], linestyle="--",
                        label=f"{role}: agreement with teacher (all rows)")
    ax_loss.set(title="training loss", xlabel="training done (%)", ylabel="loss (log scale)", yscale="log")
    _plain_log_ticks(ax_loss)
    ax_acc.set(title="accuracy during training", xlabel="training done (%)", ylabel="fraction", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=7.5, loc="lower right" if ax is ax_acc else "upper right")
        else:  # an empty chart would look like a bug; say why it is empty
            ax.text(0.5, 0.5, "no training curves (metrics/train_*.csv missing)", ha="center", transform=ax.transAxes)
    return _save(fig, path)


def _plain_log_ticks(ax: Axes) -> None:
    """Log-axis labels as plain numbers (0.01, 2, 3) instead of 10⁻² and 2×10⁰; on an axis spanning
    less than about a decade, 2, 3 and 5 times each power of ten are labelled too."""
    lo, hi = ax.get_ylim()
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    few_decades = lo > 0 and hi / lo < 12
    ax.yaxis.set_minor_formatter(FuncFormatter(
        lambda v, _: f"{v:g}" if few_decades and f"{v:e}"[0] in "235" else ""))


def _points(evals: dict, export: dict | None, x_key: str) -> list[tuple[str, float, float]]:
    pts = [(r, float(evals[r][x_key]), float(evals[r]["accuracy"])) for r in ROLES]
    if export and "onnx_int8" in export.get("student", {}):
        q = export["student"]["onnx_int8"]
        pts.append(("student int8", float(q[x_key]), float(q["accuracy"])))
    return pts


# label positions tried in order, as (dx, dy) in points and alignment: right, above, below, left
_LABEL_SPOTS = [(8, 0, "left", "center"), (6, 6, "left", "bottom"), (6, -6, "left", "top"),
                (-8, 0, "right", "center"), (-6, 6, "right", "bottom"), (-6, -6, "right", "top")]


def _label_points(fig: MplFigure, ax: Axes, points: list[tuple[float, float, str]]) -> None:
    """Write each point's label at the first spot (right of it, above, below, left) that stays inside
    the axes and covers no marker and no earlier label: models often share a size or a latency (the
    student and the baseline are one architecture), and fixed offsets would print over each other."""
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # settles autoscaling and margins: data -> pixel is final
    renderer = canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pad = 7 * fig.dpi / 72  # a marker's radius (s=90 is ~9.5 pt across), in pixels
    taken = [Bbox.from_extents(px - pad, py - pad, px + pad, py + pad)
             for px, py in ax.transData.transform([(x, y) for x, y, _ in points])]
    for x, y, text in points:
        for i, (dx, dy, ha, va) in enumerate(_LABEL_SPOTS):
            label = ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha=ha, va=va, fontsize=8)
            box = label.get_window_extent(renderer)
            fits = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            if (fits and not any(box.overlaps(t) for t in taken)) or i == len(_LABEL_SPOTS) - 1:
                taken.append(box)
                break
            label.remove()


def fig_accuracy_vs(evals: dict, export: dict | None, x_key: str, xlabel: str, scale: float, path: Path) -> str:
    """Accuracy against a cost (size or latency), one point per model; lower-right is worse."""
    fig = MplFigure(figsize=(5.5, 4))
    ax = fig.subplots()
    points = [(name, x * scale, acc) for name, x, acc in _points(evals, export, x_key)]
    for name, x, acc in points:
        ax.scatter(x, acc, s=90, color=COLORS[name], zorder=3, marker="D" if "int8" in name else "o")
    ax.set(xscale="log", xlabel=xlabel, ylabel="test accuracy", title=f"accuracy vs {xlabel.split(' (')[0]}")
    ticks: list[float] = []  # label the models, not decades; one label for models within 15 %
    for x in sorted(x for _, x, _ in points):
        if not ticks or x > ticks[-1] * 1.15:
            ticks.append(x)
    ax.set_xticks(ticks, [f"{t:.3g}" for t in ticks], fontsize=8)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(max(0.0, min(acc for _, _, acc in points) - 0.08), 1.0)
    ax.margins(x=0.35)
    ax.grid(alpha=0.3, which="both")
    _label_points(fig, ax, [(x, acc, f"{name} {acc:.3f}") for name, x, acc in points])  # after the limits are set
    return _save(fig, path)


def reliability_bins(logits: np.ndarray, y: np.ndarray, bins: int = ECE_BINS) -> tuple[np.ndarray, ...]:
    """Per equal-width confidence bin: mean confidence, accuracy and row count (NaN where empty);
    the same bins as kd_core.evaluate.ece, so the diagram and eval.json's ECE agree."""
    p = softmax(logits)
    conf, pred = p.max(1), p.argmax(1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
    counts = np.bincount(which, minlength=bins)
    with np.errstate(invalid="ignore"):
        mean_conf = np.bincount(which, conf, bins) / counts
        acc = np.bincount(which, (pred == y).astype(float), bins) / counts
    return edges, mean_conf, acc, counts


def fig_reliability(logits: dict[str, np.ndarray], y: np.ndarray, path: Path) -> str:
    fig = MplFigure(figsize=(12, 4))
    axes = fig.subplots(1, len(logits), sharey=True)
    for ax, (role, lg) in zip(np.atleast_1d(axes), logits.items(), strict=True):
        edges, _, acc, counts = reliability_bins(lg, y)
        centers, width = (edges[:-1] + edges[1:]) / 2, edges[1] - edges[0]
        shown = counts > 0
        ax.bar(centers[shown], acc[shown], width=width * 0.95, color=COLORS[role], alpha=0.8, label="accuracy")
        ax.bar(centers[shown], (centers - acc)[shown], bottom=acc[shown], width=width * 0.95, fill=False,
               edgecolor="#c44e52", hatch="//", linewidth=0.5, label="gap to calibrated")
        ax.plot([0, 1], [0, 1], color="black", linestyle=":", linewidth=1, label="perfectly calibrated")
        ax.set(title=f"{role}: ECE {ece(lg, y):.3f}", xlabel="confidence (max probability)", xlim=(0, 1), ylim=(0, 1))
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("accuracy in bin")
    handles, names = np.atleast_1d(axes)[0].get_legend_handles_labels()  # below the panels: never over a bar
    fig.legend(handles, names, loc="lower center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, -0.1), frameon=False)
    return _save(fig, path)


def confusion(pred: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """(K, K) counts: row = true class, column = predicted class."""
    return np.bincount(y * k + pred, minlength=k * k).reshape(k, k)


def fig_confusion(logits: dict[str, np.ndarray], y: np.ndarray, classes: tuple, path: Path) -> str:
    k = len(classes)
    fig = MplFigure(figsize=(4.4 * len(logits), 4.2))
    axes = np.atleast_1d(fig.subplots(1, len(logits)))
    show_ticks = k <= 30
    for ax, (role, lg) in zip(axes, logits.items(), strict=True):
        cm = confusion(lg.argmax(1), y, k)
        share = cm / np.maximum(cm.sum(1, keepdims=True), 1)  # row-normalised: recall on the diagonal
        im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        acc = np.trace(cm) / max(cm.sum(), 1)
        ax.set(title=f"{role}: accuracy {acc:.3f}", xlabel="predicted class", ylabel="true class")
        if show_ticks:
            names = [str(c) for c in classes]
            ax.set_xticks(range(k), names, rotation=90 if max(map(len, names)) > 2 else 0, fontsize=7)
            ax.set_yticks(range(k), names, fontsize=7)
            if k <= 12:
                for i in range(k):
                    for j in range(k):
                        if cm[i, j]:
                            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=6,
                                    color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=list(axes), shrink=0.8, label="share of the true class")
    return _save(fig, path)


# --- the card -----------------------------------------------------------------------------------------

def _kib(n: float) -> str:
    return f"{n / 1024:,.0f} KiB" if n >= 10 * 1024 else f"{n / 1024:,.1f} KiB"


def _ms(v: float) -> str:
    return f"{v:.3f} ms"


def _pts(fraction: float) -> str:
    """A change of accuracy in percentage points, signed; never '-0.0'."""
    return f"{round(fraction * 100, 1) + 0.0:+.1f} pts"


def metrics_table(evals: dict) -> Table:
    """The headline table, formatted like `kd compare` and the README: one row per model."""
    rows = [[r, f"{m['accuracy']:.3f}", f"{m['ece']:.3f}", f"{m['nll']:.3f}", f"{m['agreement_with_teacher']:.3f}",
             f"{m['params']:,}", f"{m['macs']:,}", _kib(m["size_bytes"]), _ms(m["latency_ms_p50"])]
            for r in ROLES for m in [evals[r]]]
    return Table(["model", "accuracy", "ECE", "NLL", "agreement with teacher", "params", "MACs", "size",
                  "latency p50 (batch 1, CPU)"], rows)


def export_table(export: dict) -> Table:
    names = {"pytorch": "PyTorch (fp32)", "onnx": "ONNX Runtime (fp32)", "onnx_int8": "ONNX Runtime (int8)"}
    rows = []
    for role in ("teacher", "student"):
        for k, v in export.get(role, {}).items():
            rows.append([f"{role}, {names.get(k, k)}", _kib(v["size_bytes"]), _ms(v["latency_ms_p50"]),
                         f"{v['accuracy']:.3f}", f"{v['max_abs_logit_diff']:.2g}" if k != "pytorch" else "—",
                         f"{v['agreement_with_pytorch']:.3f}" if k != "pytorch" else "—",
                         _pts(-v["accuracy_drop"]) if k != "pytorch" else "—"])
    return Table(["model, runtime", "file size", "latency p50 (batch 1)", "accuracy", "max abs. logit diff vs PyTorch",
                  "same class as PyTorch", "accuracy vs PyTorch"], rows)


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
    items = [
        f"The student reaches accuracy **{s['accuracy']:.3f}** on {inp.split_rows['test']:,} test rows: "
        f"{s['accuracy'] / t['accuracy'] * 100:.1f} % of the teacher's {t['accuracy']:.3f} with "
        f"1/{t['macs'] / max(s['macs'], 1):.1f} of its MACs, {t['latency_ms_p50'] / s['latency_ms_p50']:.1f}× lower "
        f"latency and {t['size_bytes'] / s['size_bytes']:.1f}× smaller weights.",
        f"Distillation is worth **{(s['accuracy'] - b['accuracy']) * 100:+.1f} points** over the same network "
        f"trained on the labels alone (baseline {b['accuracy']:.3f}); calibration error (ECE) "
        f"{b['ece']:.3f} → {s['ece']:.3f}.",
    ]
    if inp.export and "onnx_int8" in inp.export.get("student", {}):
        q = inp.export["student"]["onnx_int8"]
        fp32 = inp.export["student"].get("onnx", {})
        items.append(f"Edge: the int8 ONNX student is {_kib(q['size_bytes'])}, accuracy {q['accuracy']:.3f} "
                     f"({_pts(-q['accuracy_drop'])} vs PyTorch), {_ms(q['latency_ms_p50'])} per row with ONNX "
                     f"Runtime (fp32 ONNX: {_kib(fp32.get('size_bytes', 0))}, {_ms(fp32.get('latency_ms_p50', 0))}).")
    if inp.register:
        r = inp.register
        items.append(f"Registry: `{r['model_name']}` version {r['version']} was **{r['decision']}** "
                     f"(aliases: {', '.join(r['aliases']) or 'none'}).")
    return items


def build_blocks(inp: CardInputs, figures: dict[str, str], data_docs: str | None,
                 docs_pages: dict[str, str] | None = None) -> list[Block]:
    """The card, top to bottom. `figures` maps a figure's role to its file relative to the card;
    `docs_pages` a validated table's name to its Data Docs page."""
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
        Para(f"Classifies a row of {len(inp.features)} numeric features (`{inp.features[0]}` … `{inp.features[-1]}`) "
             f"into one of {len(inp.classes)} classes ({', '.join(map(str, inp.classes[:12]))}"
             f"{', …' if len(inp.classes) > 12 else ''}). Student `{f.get('student', '?')}` distilled from teacher "
             f"`{f.get('teacher', '?')}` on {inp.split_rows.get('train', 0):,} labelled and "
             f"{inp.split_rows.get('transfer', 0):,} unlabelled rows ({f.get('source', '?')}). Serve the registered "
             "model with MLflow (it takes raw rows and answers class names), or the ONNX files on an edge device "
             "(raw rows in feature order in, logits out)."),
        Heading("Limitations"),
        Bullets([
            f"Measured on one test split of {inp.split_rows['test']:,} rows from the same source as the training "
            "data; per-class accuracy is below. Rows unlike the training data are out of scope.",
            "Latencies are medians of single-row CPU inference on the machine that ran the pipeline "
            f"({f.get('threads', '?')} threads); re-measure on the target device.",
            "Probabilities are only as calibrated as the reliability diagrams show; do not read them as exact risks.",
        ]),
        Heading("Metrics on the test set"), metrics_table(inp.evals),
    ]
    if inp.export:
        blocks += [Heading("Edge export (ONNX)"),
                   Para("The student exported to ONNX (fp32) and quantized to int8 (ONNX Runtime dynamic "
                        "quantization, per-channel weights), each checked against PyTorch on the test rows. "
                        "Latencies are measured in one process, interleaved, so machine noise hits all alike; "
                        "the PyTorch rows are re-measured here and can differ from the table above by noise."),
                   export_table(inp.export)]
    if reg:
        blocks += [Heading("Promotion decision"),
                   Para(f"**{reg['decision']}**: one line per rule of `policy` in `params.yaml`."),
                   Bullets([f"`{r}`" for r in reg["reasons"]])]
    blocks += [
        Heading("Training curves"),
        Image(figures["training"], "Loss and accuracy per epoch: student (KD) against the hard-label baseline "
                                   "(`metrics/train_*.csv`); dotted: held-out validation rows."),
        Heading("Accuracy against cost"),
        Image(figures["size"], "Test accuracy against weights file size (log scale).", half=True),
        Image(figures["latency"], "Test accuracy against batch-1 CPU latency (log scale; int8 on ONNX Runtime).",
              half=True),
        Heading("Calibration"),
        Image(figures["reliability"], f"Reliability diagrams ({ECE_BINS} equal-width confidence bins): bars "
                                        "on the diagonal are perfectly calibrated; ECE as in eval.json."),
        Heading("Errors by class"),
        Image(figures["confusion"], "Confusion matrices on the test set (rows: true class, normalised per row; "
                                    "numbers: rows)."),
        Heading("Per-class accuracy", 3),
        *per_class_blocks(inp.evals, inp.classes),
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


def write_card(inp: CardInputs, out: Path, data_docs: str | None = None) -> dict[str, Path]:
    """Draw the figures into out/figures and write out/model_card.{md,html}; returns the written paths."""
    fig_dir = out / FIGURES
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures = {
        "training": fig_training_curves(inp.curves, fig_dir / "training_curves.png"),
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
    blocks = build_blocks(inp, {k: f"{FIGURES}/{v}" for k, v in figures.items()}, data_docs, pages)
    title = blocks[0].text if isinstance(blocks[0], Heading) else "Model card"
    (out / MD_FILE).write_text(to_markdown(blocks))
    (out / HTML_FILE).write_text(to_html(blocks, title, out))
    return {"markdown": out / MD_FILE, "html": out / HTML_FILE,
            **{k: fig_dir / v for k, v in figures.items()}}


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
