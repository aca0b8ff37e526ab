"""The model card: every figure referenced and a valid PNG, numbers as in eval.json, calibration bins as ECE."""

import base64
import io
import json
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from kd_core import card
from kd_core.card import content, figures, render
from kd_core.config import parse_params
from kd_core.metrics_table import ROLES, export_table

ROOT = Path(__file__).resolve().parents[2]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(blob: bytes) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk; fails on anything that is not a PNG."""
    assert blob[:8] == PNG_SIGNATURE, "not a PNG"
    length, kind = struct.unpack(">I4s", blob[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", blob[16:24])


def _evals(rng: np.random.Generator, classes: tuple) -> dict:
    def role(acc: float, params: int, latency: float) -> dict:
        return {"accuracy": acc, "ece": float(rng.uniform(0, 0.2)), "nll": float(rng.uniform(0.2, 2)),
                "agreement_with_teacher": float(rng.uniform(0.5, 1)), "params": params, "macs": params,
                "latency_ms_p50": latency, "size_bytes": params * 4,
                "per_class_accuracy": {str(c): float(rng.uniform(0.3, 1)) for c in classes}}

    return {"teacher": role(0.9123, 100_000, 0.15), "baseline": role(0.6049, 40_000, 0.03),
            "student": role(0.8631, 40_000, 0.031)}


def card_inputs(classes: tuple = ("cat", "dog", "eel"), n: int = 300, with_extras: bool = True) -> card.CardInputs:
    rng = np.random.default_rng(0)
    y = rng.integers(0, len(classes), n)
    logits = {r: rng.normal(size=(n, len(classes))).astype(np.float32) * s for r, s in
              (("teacher", 4), ("baseline", 1), ("student", 3))}
    curve = [{"epoch": float(e), "loss": 2.0 / e, "accuracy": 1 - 1 / (e + 1), "agreement_with_teacher": 0.9}
             for e in range(1, 6)]
    export = {"student": {k: {"size_bytes": s, "latency_ms_p50": 0.01, "accuracy": 0.86, "max_abs_logit_diff": d,
                              "agreement_with_pytorch": 0.99, "accuracy_drop": 0.001}
                          for k, s, d in (("pytorch", 160_000, 0.0), ("onnx", 170_000, 1e-5),
                                          ("onnx_int8", 50_000, 0.9))}, "teacher": {}}
    register = {"decision": "promoted", "reasons": ["teacher_retention 0.9461 >= 0.8500: pass"],
                "model_name": "kd-student", "version": 3, "aliases": ["challenger", "champion"]}
    return card.CardInputs(
        evals=_evals(rng, classes), curves={"student": curve, "baseline": [dict(r) for r in curve]},
        logits=logits, labels=y, classes=classes, row="a row of 3 numeric features (`f0` … `f2`)",
        split_rows={"train": 400, "test": n, "transfer": 1000},
        validation={"splits": {"train": {"rows": 400, "expectations": 12, "failed_expectations": 0}}},
        register=register if with_extras else None, export=export if with_extras else None,
        facts={"git_commit": "abc123", "generated": "today"})


@pytest.mark.parametrize("with_extras", [True, False])
def test_html_card_references_every_figure_and_each_is_a_valid_png(tmp_path: Path, with_extras: bool):
    written = card.write_card(card_inputs(with_extras=with_extras), tmp_path, data_docs="data_docs/index.html")
    figures = sorted((tmp_path / card.FIGURES).glob("*.png"))
    assert len(figures) == 5
    for f in figures:
        width, height = png_size(f.read_bytes())
        assert width > 200 and height > 200 and f.stat().st_size > 5_000, f.name  # a drawn chart, not a stub

    page = (tmp_path / card.HTML_FILE).read_text()
    embedded = {name: blob for blob, name in re.findall(r'<img src="data:image/png;base64,([^"]+)" '
                                                        r'data-file="([^"]+)"', page)}
    assert sorted(embedded) == [f"{card.FIGURES}/{f.name}" for f in figures]
    for name, blob in embedded.items():  # the HTML carries exactly the PNG files' bytes
        assert base64.b64decode(blob) == (tmp_path / name).read_bytes()

    markdown = (tmp_path / card.MD_FILE).read_text()
    for f in figures:
        assert f"]({card.FIGURES}/{f.name})" in markdown
    assert "data_docs/index.html" in markdown and 'href="data_docs/index.html"' in page
    assert set(written) >= {"markdown", "html"}


def test_card_numbers_are_eval_json_numbers(tmp_path: Path):
    inp = card_inputs()
    card.write_card(inp, tmp_path)
    markdown = (tmp_path / card.MD_FILE).read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in markdown.splitlines() if line.startswith("| ") and line.split("|")[1].strip() in ROLES}
    for role in ROLES:
        m = inp.evals[role]
        assert rows[role][:3] == [f"{m['accuracy']:.3f}", f"{m['ece']:.3f}", f"{m['nll']:.3f}"]
        assert f"{m['params']:,}" in rows[role] and f"{m['latency_ms_p50']:.3f} ms" in rows[role]
    assert "version 3" in markdown and "**promoted**" in markdown
    assert "| student, ONNX Runtime (int8) | 49 KiB |" in markdown
    assert f"| student int8 (ONNX) | {inp.export['student']['onnx_int8']['accuracy']:.3f} |" in markdown


def test_confusion_counts():
    cm = figures.confusion(np.array([0, 1, 1, 2]), np.array([0, 1, 2, 2]), 3)
    assert cm.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_markdown_table_numbers_right_aligned():
    text = render.to_markdown([render.Table(["a", "b"], [["1", "2"]])])
    assert text.splitlines()[1] == "| --- | ---: |"


def test_many_classes_show_the_students_worst():
    classes = tuple(range(100))
    evals = {r: {"per_class_accuracy": {str(c): c / 100 for c in classes}} for r in ROLES}
    note, table = content.per_class_blocks(evals, classes, limit=5)
    assert "5 least accurate of 100" in note.text and [row[0] for row in table.rows] == ["0", "1", "2", "3", "4"]


def test_point_labels_never_overlap_when_models_share_a_cost():
    """The student and the baseline are one architecture: same size, near-equal accuracy. Fixed label
    offsets printed their labels over each other; every label must now have its own spot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    points = [(414.0, 0.85, "teacher 0.850"), (175.0, 0.584, "student 0.584"), (175.0, 0.555, "baseline 0.555"),
              (56.0, 0.581, "student int8 0.581"), (60.0, 0.579, "other 0.579")]
    ax.scatter([x for x, _, _ in points], [y for _, y, _ in points])
    ax.set(xscale="log", ylim=(0.5, 1.0))
    ax.margins(x=0.35)
    figures._label_points(fig, ax, points)
    renderer = FigureCanvasAgg(fig).get_renderer()
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(boxes) == len(points)
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def test_validation_table_links_each_tables_data_docs_page(tmp_path: Path):
    """The Data Docs index needs scripts from CDNs; each split's own page is linked so it reads offline."""
    page = tmp_path / "data_docs/validations/kd.train/kd-validate/20260101T000000Z/train.html"
    page.parent.mkdir(parents=True)
    page.write_text("<html></html>")
    card.write_card(card_inputs(), tmp_path, data_docs="data_docs/index.html")
    rel = page.relative_to(tmp_path).as_posix()
    assert f"| train | 400 | 12 | 0 | [results]({rel}) |" in (tmp_path / card.MD_FILE).read_text()
    assert f'<a href="{rel}">results</a>' in (tmp_path / card.HTML_FILE).read_text()


def _markdown(inp: card.CardInputs, **facts: str) -> str:
    """The card's markdown without drawing the figures."""
    inp = content.CardInputs(**{**inp.__dict__, "facts": {**inp.facts, **facts}})
    names = {k: f"{card.FIGURES}/{k}.png" for k in ("training", "size", "latency", "reliability", "confusion")}
    return render.to_markdown(content.build_blocks(inp, names, None))


def test_card_describes_the_ensemble_of_teachers_not_the_unused_teacher_section():
    """With a `teachers` list the card used to describe `teacher:`, a model no stage trained."""
    params = parse_params({"teacher": {"arch": "mlp", "options": {"hidden": [999]}},
                           "teachers": [{"arch": "cnn1d", "options": {"channels": 8}},
                                        {"arch": "mlp", "options": {"hidden": [16]}, "source": "models:/t@champion"}],
                           "distill": {"ensemble": "probs"}})
    described = card.gather.teacher_description(params)
    assert described.startswith("ensemble of 2 (mean probabilities): cnn1d {'channels': 8}")
    assert "mlp {'hidden': [16]} (source: models:/t@champion" in described and "999" not in described
    assert card.gather.teacher_description(parse_params({})).startswith("cnn1d {}")

    assert f"`teacher`: {described}" in _markdown(card_inputs(), teacher=described)


@pytest.mark.parametrize(("raw", "label"), [
    ({}, "KL·T² + CE"),
    ({"distill": {"loss": "dkd"}}, "DKD (α·TCKD + β·NCKD)·T² + CE"),
    ({"distill": {"loss": "mse"}}, "MSE on logits + CE"),
    ({"distill": {"loss": "mse_l2"}}, "MSE on logits + λ‖w‖²"),
    ({"cache": {"top_k": 4}}, "top-k KL·T² (cached top-k + tail bucket) + CE"),
    ({"cache": {"top_k": 4}, "distill": {"loss": "dkd"}}, "DKD (α·TCKD + β·NCKD)·T² + CE"),  # dense view of top-k
    ({"cache": {"features": [{"module": "net.convs.1", "pool": "mean"}]},
      "distill": {"features": [{"teacher": "net.convs.1", "student": "net.0", "loss": "cosine"}]}},
     "KL·T² + CE + 1 feature hint(s) (cosine)"),
])
def test_card_names_the_loss_the_student_trained_with(raw: dict, label: str):
    """Every training curve used to be labelled "KL·T² + CE", whatever `distill.loss` was."""
    assert card.loss_label(parse_params(raw)) == label
    assert f"student (KD loss: {label})" in _markdown(card_inputs(), loss=label)


def _table_rows(text: str, sep: str) -> list[list[str]]:
    """The cells of every table row of a markdown (`|`) or rich console (`│`) table."""
    return [[c.strip() for c in line.split(sep)[1:-1]] for line in text.splitlines()
            if line.strip().startswith(sep) and not set(line) <= set(f"{sep}-: ")]


def test_console_views_and_card_show_the_same_metrics_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """`kd compare`, `kd run`'s summary and the card render one table model: the same cells, row by row
    (they were three renderings with their own formats)."""
    from rich.console import Console

    from kd_core.cli import outputs, pipeline

    inp = card_inputs()
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics/eval.json").write_text(json.dumps(inp.evals))
    (tmp_path / "metrics/export.json").write_text(json.dumps(inp.export))
    monkeypatch.chdir(tmp_path)
    card_rows = _table_rows(_markdown(inp), "|")
    for view, run in (("compare", lambda: outputs.compare(tmp_path)),
                      ("summary", lambda: pipeline._print_summary(tmp_path / "metrics"))):
        console = Console(file=io.StringIO(), width=400)
        monkeypatch.setattr(outputs, "out", console)
        monkeypatch.setattr(pipeline, "out", console)
        run()
        shown = _table_rows(console.file.getvalue(), "│")
        assert len(shown) == len(ROLES) + 1, view  # three models and the int8 student
        assert all(row in card_rows for row in shown), view
    assert [list(r) for r in export_table(inp.export).rows] == [r for r in card_rows if r[0].startswith("student,")]


def test_a_narrow_console_gets_models_as_columns_and_every_number_whole():
    """On an 80-column terminal one row per model would cut numbers; the table turns, cells stay whole."""
    from rich.console import Console

    from kd_core.cli.app import rich_table
    from kd_core.metrics_table import models_table

    inp = card_inputs()
    t = models_table(inp.evals, inp.export)
    console = Console(file=io.StringIO(), width=80)
    console.print(rich_table(t, "models", console.width))
    text = console.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= 80
    for row in t.rows:
        assert all(cell in text for cell in row[1:]), row
