"""The model card's figures (matplotlib, Agg canvas: no display, no global state), each saved as a PNG
with stable bytes (no version metadata).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure as MplFigure
from matplotlib.ticker import FuncFormatter, NullFormatter
from matplotlib.transforms import Bbox

from kd_core.evaluate import ece, reliability_bins
from kd_core.metrics_table import ROLES

COLORS = {"teacher": "#4c72b0", "baseline": "#8c8c8c", "student": "#dd8452", "student int8": "#c44e52"}
DPI = 110  # sharp on a laptop screen, ~50 KiB per figure


def save_png(fig: MplFigure, path: Path) -> str:
    fig.savefig(path, dpi=DPI, bbox_inches="tight", metadata={"Software": None})  # no version: stable bytes
    return path.name


def fig_training_curves(curves: dict[str, list[dict[str, float]]], path: Path, student_loss: str) -> str:
    """Loss and accuracy per epoch, x = share of training done (the baseline runs more, shorter epochs
    for the same number of optimiser steps). Held-out validation accuracy is drawn next to training
    accuracy because it is what picks the kept epoch, and the gap between them shows overfitting."""
    fig = MplFigure(figsize=(11, 3.8))
    ax_loss, ax_acc = fig.subplots(1, 2)
    labels = {"student": f"student (KD loss: {student_loss})", "baseline": "baseline (cross-entropy)"}
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
    return save_png(fig, path)


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
    return save_png(fig, path)


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
    return save_png(fig, path)


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
    return save_png(fig, path)
