"""The image task's part of the model card: a grid of test images with the teacher's and the student's
predictions (wrong ones in red), and what the view cache holds and costs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure as MplFigure

from kd_core import data
from kd_core.cache import read_manifest
from kd_core.card.content import CardInputs
from kd_core.card.figures import save_png
from kd_core.card.render import Block, Heading, Image, Para
from kd_core.config import Params
from kd_core.tasks.image import data as image_data
from kd_core.tasks.image import views as view_cache

GRID = (4, 8)  # rows × columns of test images shown
GRID_FILE = "test_images.png"


def pick(y: np.ndarray, student_pred: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Test rows to show: a seeded draw, half of them (when there are that many) rows the student gets
    wrong, so the grid shows where it fails as well as where it works.  # (n,)"""
    rng = np.random.default_rng(seed)
    wrong, right = np.flatnonzero(student_pred != y), np.flatnonzero(student_pred == y)
    k = min(len(wrong), n // 2)
    chosen = np.concatenate([rng.choice(wrong, k, replace=False), rng.choice(right, min(len(right), n - k),
                                                                              replace=False)])
    return np.sort(chosen)


def fig_grid(images: np.ndarray, y: np.ndarray, teacher: np.ndarray, student: np.ndarray, classes: tuple,
             path: Path) -> str:
    """Each image with its true class, the teacher's and the student's prediction (red when wrong).
    # images (n, C, S, S) uint8"""
    rows, cols = GRID
    fig = MplFigure(figsize=(cols * 1.5, rows * 1.85))
    axes = fig.subplots(rows, cols).reshape(-1)
    for ax in axes:
        ax.set_axis_off()
    for ax, img, t, ps, pt in zip(axes, images, y, student, teacher, strict=False):
        shown = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0)
        ax.imshow(shown, cmap="gray" if img.shape[0] == 1 else None, vmin=0, vmax=255)
        name = lambda i: str(classes[i])[:14]  # noqa: E731
        ax.set_title(f"true {name(t)}", fontsize=6.5)
        ax.text(0.5, -0.08, f"teacher {name(pt)}", transform=ax.transAxes, ha="center", va="top", fontsize=6.5,
                color="black" if pt == t else "#c44e52")
        ax.text(0.5, -0.22, f"student {name(ps)}", transform=ax.transAxes, ha="center", va="top", fontsize=6.5,
                color="black" if ps == t else "#c44e52")
    fig.subplots_adjust(hspace=0.6)
    return save_png(fig, path)


def cache_line(params: Params, workdir: Path) -> str:
    """The view cache as the card states it: views, rows, bytes per view and in all."""
    cache = workdir / params.paths.logits
    manifest = read_manifest(cache)
    files = [cache / a["file"] for s in manifest["shards"] for a in s["arrays"].values()]
    views = manifest.get("views")
    if views:
        files.append(cache / views["file"])
    total = sum(f.stat().st_size for f in files if f.is_file())
    rows = int(manifest["rows"])
    what = (view_cache.describe(views["per_row"], views["augment"]) if views
            else "the plain images (cache.views: 0)")
    return (f"The logit cache holds {rows:,} rows — {what} — at {total / max(rows, 1):.0f} bytes per row "
            f"(logits and view parameters), {total / 2**20:.1f} MiB in all: the teacher ran once over them, "
            "and the student replays exactly these views instead of running the teacher every epoch.")


def extra_blocks(params: Params, workdir: Path, inp: CardInputs):  # -> Callable[[Path], (blocks, files)]
    """The card's image section, drawn into the figures folder `write_card` passes."""
    def draw(fig_dir: Path) -> tuple[list[Block], dict[str, Path]]:
        splits = data.read_prepared(workdir / params.paths.prepared)
        student, teacher = inp.logits["student"].argmax(1), inp.logits["teacher"].argmax(1)
        chosen = pick(inp.labels, student, GRID[0] * GRID[1])
        images = image_data.to_array(splits.test.iloc[chosen], splits.schema.image_info)
        name = fig_grid(images, inp.labels[chosen], teacher[chosen], student[chosen], inp.classes,
                        fig_dir / GRID_FILE)
        blocks: list[Block] = [
            Heading("Test images"),
            Image(f"figures/{name}", "Test images with the true class and the teacher's and the student's "
                                     "predictions (red: wrong); half of them drawn from the student's errors."),
            Heading("View cache", 3), Para(cache_line(params, workdir))]
        return blocks, {"images": fig_dir / name}
    return draw
