"""report: the model card (reports/model_card.{md,html} + figures) and Great Expectations Data Docs.

Reads what the run wrote (eval.json, export.json, register.json, training curves, validation
results), re-scores the three models on the test rows for the calibration and confusion figures,
and attaches the card to the registered version's run in MLflow.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from kd_core import card, tasks, validation
from kd_core.config import Params
from kd_core.curves import read_curve
from kd_core.errors import UserError
from kd_core.provenance import git_commit
from kd_core.stages._registered import REGISTER_FILE, registered_version
from kd_core.tasks.lm import require_stage


@dataclass(frozen=True)
class ReportResult:
    card: Path
    figures: int
    version: int | None

    def summary(self) -> str:
        where = f"; attached to version {self.version}" if self.version is not None else ""
        return f"model card {self.card} (+ .md) with {self.figures} figures and Data Docs{where}"


EXPORT_FILE = "export.json"  # written by the export stage


def _json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def inputs(params: Params, workdir: Path) -> card.CardInputs:
    metrics = workdir / params.paths.metrics
    evals = _json(metrics / "eval.json")
    if evals is None:
        raise UserError(f"{metrics / 'eval.json'} not found: run the evaluate stage first")
    dirs = {"teacher": params.paths.teacher, "baseline": params.paths.baseline, "student": params.paths.student}
    logits, y, splits = card.score_test_split(params, {r: workdir / d for r, d in dirs.items()},
                                              workdir / params.paths.prepared)
    validation_summary = _json(workdir / params.paths.validation / validation.SUMMARY_FILE) or {}
    register = _json(metrics / REGISTER_FILE)
    facts = {"generated": card.now(), "git_commit": git_commit(workdir), "threads": str(torch.get_num_threads()),
             "source": params.data.source, "teacher": card.teacher_description(params), "loss": card.loss_label(params),
             "student": f"{params.student.arch} {dict(params.student.options)}",
             "distill": f"loss {params.distill.loss}, temperature {params.distill.temperature}, "
                        f"alpha {params.distill.alpha}",
             "train": f"{params.train.epochs} epochs, batch {params.train.batch_size}, lr {params.train.lr}",
             "cache": f"{params.cache.dtype}, " + (f"top {params.cache.top_k} logits per row" if params.cache.top_k
                                                   else "dense (every logit)"),
             "data": f"source {params.data.source}"}
    return card.CardInputs(
        evals=evals,
        curves={r: read_curve(metrics / f"train_{r}.csv") for r in ("student", "baseline")},
        logits=logits, labels=y, classes=splits.schema.classes,
        row=tasks.for_params(params).describe(splits.schema),
        split_rows={"train": len(splits.train), "test": len(splits.test), "transfer": len(splits.transfer)},
        validation=validation_summary, register=register, export=_json(metrics / EXPORT_FILE), facts=facts)


def _publish(tmp: Path, reports: Path, names: tuple[str, ...]) -> None:
    """Move finished files and folders from the scratch dir over the previous card's."""
    for name in names:
        final = reports / name
        if final.is_dir():
            shutil.rmtree(final)
        os.replace(tmp / name, final)


def run(params: Params, workdir: Path) -> ReportResult:
    require_stage(params.task, "report")
    reports = workdir / params.paths.reports
    reports.mkdir(parents=True, exist_ok=True)
    card_inputs = inputs(params, workdir)
    with tempfile.TemporaryDirectory(prefix=".card.", dir=reports) as scratch:
        tmp = Path(scratch)
        validation.build_data_docs(workdir / params.paths.validation, tmp / card.DATA_DOCS)
        written = card.write_card(card_inputs, tmp, data_docs=f"{card.DATA_DOCS}/index.html")
        _publish(tmp, reports, (card.FIGURES, card.DATA_DOCS, card.MD_FILE, card.HTML_FILE))
    version = registered_version(params, workdir)
    if version is not None:
        from kd_core import versions  # mlflow loads only when there is a version to attach to

        dest = params.paths.reports
        versions.attach_to_version(
            workdir, params.registry.model_name, version, {"model_card": f"{dest}/{card.HTML_FILE}"}, {},
            [(dest, reports / card.MD_FILE), (dest, reports / card.HTML_FILE),
             (f"{dest}/{card.FIGURES}", reports / card.FIGURES),
             (f"{dest}/{card.DATA_DOCS}", reports / card.DATA_DOCS)])
    return ReportResult(reports / card.HTML_FILE, len(written) - 2, version)
