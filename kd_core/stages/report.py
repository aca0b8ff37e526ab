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

from kd_core import card, data, tasks, validation
from kd_core.card import lm_content
from kd_core.config import Params
from kd_core.curves import read_curve
from kd_core.errors import UserError
from kd_core.provenance import git_commit
from kd_core.stages._registered import REGISTER_FILE, registered_version


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


def _facts(params: Params, workdir: Path) -> dict[str, str]:
    return {"generated": card.now(), "git_commit": git_commit(workdir), "threads": str(torch.get_num_threads()),
             "source": params.data.source, "teacher": card.teacher_description(params), "loss": card.loss_label(params),
             "student": f"{params.student.arch} {dict(params.student.options)}",
             "distill": card.setting_line(params, workdir / params.paths.student),
             "train": f"{params.train.epochs} epochs, batch {params.train.batch_size}, lr {params.train.lr}",
             "cache": f"{params.cache.dtype}, " + (f"top {params.cache.top_k} logits per row" if params.cache.top_k
                                                   else "dense (every logit)"),
             "data": f"source {params.data.source}"}


def _evals(params: Params, workdir: Path) -> dict:
    evals = _json(workdir / params.paths.metrics / "eval.json")
    if evals is None:
        raise UserError(f"{workdir / params.paths.metrics / 'eval.json'} not found: run the evaluate stage first")
    return evals


def _dirs(params: Params, workdir: Path) -> dict[str, Path]:
    return {r: workdir / d for r, d in (("teacher", params.paths.teacher), ("baseline", params.paths.baseline),
                                        ("student", params.paths.student))}


def inputs(params: Params, workdir: Path) -> card.CardInputs:
    metrics, evals = workdir / params.paths.metrics, _evals(params, workdir)
    logits, y, splits = card.score_test_split(params, _dirs(params, workdir), workdir / params.paths.prepared)
    validation_summary = _json(workdir / params.paths.validation / validation.SUMMARY_FILE) or {}
    register = _json(metrics / REGISTER_FILE)
    facts = _facts(params, workdir)
    return card.CardInputs(
        evals=evals,
        curves={r: read_curve(metrics / f"train_{r}.csv") for r in ("student", "baseline")},
        logits=logits, labels=y, classes=splits.schema.classes,
        row=tasks.for_params(params).describe(splits.schema),
        split_rows={"train": len(splits.train), "test": len(splits.test), "transfer": len(splits.transfer)},
        validation=validation_summary, register=register, export=_json(metrics / EXPORT_FILE), facts=facts)


def lm_inputs(params: Params, workdir: Path) -> lm_content.LMCardInputs:
    """`task: lm`: the same files, plus sample completions and the cache's cost per token."""
    metrics, evals = workdir / params.paths.metrics, _evals(params, workdir)
    splits = data.read_prepared(workdir / params.paths.prepared)
    return lm_content.LMCardInputs(
        evals=evals, curves={r: read_curve(metrics / f"train_{r}.csv") for r in ("student", "baseline")},
        samples=lm_content.sample_completions(_dirs(params, workdir), splits),
        cache=lm_content.manifest(workdir / params.paths.logits),
        row=tasks.for_params(params).describe(splits.schema),
        split_rows={"train": len(splits.train), "test": len(splits.test)},
        validation=_json(workdir / params.paths.validation / validation.SUMMARY_FILE) or {},
        register=_json(metrics / REGISTER_FILE), export=_json(metrics / EXPORT_FILE), facts=_facts(params, workdir))


def _publish(tmp: Path, reports: Path, names: tuple[str, ...]) -> None:
    """Move finished files and folders from the scratch dir over the previous card's."""
    for name in names:
        final = reports / name
        if final.is_dir():
            shutil.rmtree(final)
        os.replace(tmp / name, final)


def run(params: Params, workdir: Path) -> ReportResult:
    reports = workdir / params.paths.reports
    reports.mkdir(parents=True, exist_ok=True)
    lm = params.task == "lm"  # its card has no classes: samples, perplexity and the cache's bytes per token
    card_inputs = lm_inputs(params, workdir) if lm else inputs(params, workdir)
    with tempfile.TemporaryDirectory(prefix=".card.", dir=reports) as scratch:
        tmp = Path(scratch)
        validation.build_data_docs(workdir / params.paths.validation, tmp / card.DATA_DOCS)
        docs = f"{card.DATA_DOCS}/index.html"
        written = (lm_content.write_card(card_inputs, tmp, data_docs=docs)
                   if isinstance(card_inputs, lm_content.LMCardInputs)
                   else card.write_card(card_inputs, tmp, data_docs=docs))
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
