"""report: the model card (reports/model_card.{md,html} + figures) and Great Expectations Data Docs.

Reads what the run wrote (eval.json, export.json, register.json, training curves, validation
results), re-scores the three models on the test rows for the calibration and confusion figures,
and attaches the card to the registered version's run in MLflow.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kd_core import card, tasks, validation
from kd_core.config import Params
from kd_core.stages._registered import registered_version


@dataclass(frozen=True)
class ReportResult:
    card: Path
    figures: int
    version: int | None

    def summary(self) -> str:
        where = f"; attached to version {self.version}" if self.version is not None else ""
        return f"model card {self.card} (+ .md) with {self.figures} figures and Data Docs{where}"


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
    with tempfile.TemporaryDirectory(prefix=".card.", dir=reports) as scratch:
        tmp = Path(scratch)
        validation.build_data_docs(workdir / params.paths.validation, tmp / card.DATA_DOCS)
        docs = f"{card.DATA_DOCS}/index.html"
        written = tasks.for_params(params).write_card(params, workdir, tmp, docs)
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
