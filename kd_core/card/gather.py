"""What a model card reads from a finished run: eval/export/register JSON, curves, validation summary
and the facts line, gathered from the paths params.yaml names. Tasks build their card from these."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kd_core import tasks, validation
from kd_core.card.content import CardInputs, loss_label, now, score_test_split, setting_line, write_card
from kd_core.config import Params
from kd_core.curves import read_curve
from kd_core.errors import UserError
from kd_core.provenance import git_commit
from kd_core.stages._registered import REGISTER_FILE

EXPORT_FILE = "export.json"  # written by the export stage


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def teacher_description(params: Params) -> str:
    """The teacher the student learned from: the one `teacher`, or the ensemble of the `teachers`
    list (then `teacher:` is unused and describing it would name a model nobody trained)."""
    one = tasks.for_params(params).describe_teacher
    if not params.teachers:
        return one(params.teacher)
    how = "mean logits" if params.distill.ensemble == "logits" else "mean probabilities"
    return f"ensemble of {len(params.teachers)} ({how}): " + "; ".join(one(t) for t in params.teachers)


def facts(params: Params, workdir: Path) -> dict[str, str]:
    return {"generated": now(), "git_commit": git_commit(workdir), "threads": str(torch.get_num_threads()),
            "source": params.data.source, "teacher": teacher_description(params), "loss": loss_label(params),
            "student": f"{params.student.arch} {dict(params.student.options)}",
            "distill": setting_line(params, workdir / params.paths.student),
            "train": f"{params.train.epochs} epochs, batch {params.train.batch_size}, lr {params.train.lr}",
            "cache": f"{params.cache.dtype}, " + (f"top {params.cache.top_k} logits per row" if params.cache.top_k
                                                  else "dense (every logit)")
                     + (f", {params.cache.views} augmented views per row" if params.cache.views else ""),
            "data": f"source {params.data.source}"}


def evals(params: Params, workdir: Path) -> dict:
    found = read_json(workdir / params.paths.metrics / "eval.json")
    if found is None:
        raise UserError(f"{workdir / params.paths.metrics / 'eval.json'} not found: run the evaluate stage first")
    return found


def model_dirs(params: Params, workdir: Path) -> dict[str, Path]:
    return {r: workdir / d for r, d in (("teacher", params.paths.teacher), ("baseline", params.paths.baseline),
                                        ("student", params.paths.student))}


def curves(params: Params, workdir: Path) -> dict[str, list[dict[str, float]]]:
    return {r: read_curve(workdir / params.paths.metrics / f"train_{r}.csv") for r in ("student", "baseline")}


def validation_summary(params: Params, workdir: Path) -> dict:
    return read_json(workdir / params.paths.validation / validation.SUMMARY_FILE) or {}


def classifier_inputs(params: Params, workdir: Path) -> CardInputs:
    """A classifier's card: the run's files plus the three models re-scored on the test rows."""
    metrics, found = workdir / params.paths.metrics, evals(params, workdir)  # no eval.json: say so before scoring
    logits, y, splits = score_test_split(params, model_dirs(params, workdir), workdir / params.paths.prepared)
    return CardInputs(
        evals=found, curves=curves(params, workdir),
        logits=logits, labels=y, classes=splits.schema.classes,
        row=tasks.for_params(params).describe(splits.schema),
        split_rows={"train": len(splits.train), "test": len(splits.test), "transfer": len(splits.transfer)},
        validation=validation_summary(params, workdir), register=read_json(metrics / REGISTER_FILE),
        export=read_json(metrics / EXPORT_FILE), facts=facts(params, workdir))


def classifier_card(params: Params, workdir: Path, out: Path, data_docs: str) -> dict[str, Path]:
    """What the classifier tasks' `write_card` does."""
    return write_card(classifier_inputs(params, workdir), out, data_docs=data_docs)
