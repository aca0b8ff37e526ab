"""export: the student as ONNX and int8 ONNX, checked against PyTorch -> artifacts/onnx, metrics/export.json.

The int8 file is calibrated and its recipe chosen on training rows only (kd_core.quantize); with
`export.int8: qad` it is made from a quantization-aware fine-tune of the student against the same
cached teacher logits (kd_core.qad; resumable like training). The policy's int8 rules then judge it
on the test split. A rejection is a decision, like a rejected promotion: the int8 file is not shipped
(the fp32 ONNX is), export.json, the version's tags and the card say why, and the DAG goes on. Bad
input stays an error that leaves the last export in place. The result is attached to
the model version `register` wrote to metrics/register.json: tags on the version and files on its run.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd_core import data, export, models, policy, progress, qad, search, tasks
from kd_core.config import Params
from kd_core.errors import UserError
from kd_core.fs import atomic_dir, atomic_write_text
from kd_core.stages._common import checkpoint_path, discard_checkpoints, validation_rows
from kd_core.stages._distil import kd_objective, kd_rows
from kd_core.stages._registered import registered_version
from kd_core.train import FitConfig, checkpoint_epochs, fit

OUTPUT_FILE = "export.json"
TAGGED = ("size_bytes", "latency_ms_p50", "accuracy", "max_abs_logit_diff", "mean_abs_logit_diff",
          "agreement_with_pytorch", "accuracy_drop")


@dataclass(frozen=True)
class ExportResult:
    report: export.ExportReport
    out: Path
    model_name: str | None = None
    version: int | None = None
    int8_rejected: tuple[str, ...] = ()  # the int8 rules that failed: the int8 file was not shipped

    def summary(self) -> str:
        s = self.report.student
        pt, fp, q = s["pytorch"], s["onnx"], s["onnx_int8"]
        where = f"; attached to {self.model_name} version {self.version}" if self.version is not None else ""
        change = round(-q.accuracy_drop * 100, 1) + 0.0  # + 0.0: never print -0.0
        recipe = self.report.int8
        how = f"{recipe.chosen.method}, {recipe.chosen.activations} activations" + (
            " after QAD" if recipe.source == "qad" else "")
        rejected = "; ".join(self.int8_rejected)
        verdict = f"; REJECTED by the policy, not shipped: {rejected}" if rejected else ""
        return (f"ONNX {fp.size_bytes / 1024:.0f} KiB (max |Δlogit| {fp.max_abs_logit_diff:.1g}), int8 ({how}) "
                f"{q.size_bytes / 1024:.0f} KiB (accuracy {q.accuracy:.3f}, {change:+.1f} pts, agreement "
                f"{q.agreement_with_pytorch:.3f}{verdict}); batch-1 latency PyTorch {pt.latency_ms_p50:.3f} / ONNX "
                f"{fp.latency_ms_p50:.3f} / int8 {q.latency_ms_p50:.3f} ms -> {self.out}{where}")


def version_tags(report: export.ExportReport, decision: policy.Decision) -> dict[str, str]:
    """The headline numbers as version tags (onnx.max_abs_logit_diff, onnx_int8.accuracy_drop, …),
    how the int8 file was made, and the int8 rules' verdict."""
    tags = {f"{k}.{m}": f"{getattr(v, m):.6g}" for k, v in report.student.items() for m in TAGGED
            if not (k == "pytorch" and m not in ("size_bytes", "latency_ms_p50", "accuracy"))}
    recipe = report.int8
    tags |= {"int8.source": recipe.source, "int8.method": recipe.chosen.method,
             "int8.kept_float": ",".join(recipe.chosen.kept_float) or "none",
             "int8.activations": recipe.chosen.activations,
             "int8.decision": "accepted" if decision.decision == "promoted" else "rejected"}
    tags |= {f"int8.{k}": str(v) for k, v in (recipe.lineage or {}).items()}
    return tags | {f"reason.{r.split()[0]}": r for r in decision.reasons}


def int8_samples(params: Params, task: tasks.Task, splits: data.Splits) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint seeded samples of the rows the student trained on (train minus the held-out validation
    rows, plus transfer rows): calibration rows, then selection rows. Never a test row."""
    x = task.cache_inputs(splits)  # (N, ...) labelled rows first, as the student saw them
    val = validation_rows(len(splits.train), params.train.val_fraction, params.train.seed)
    trained = np.random.default_rng(params.train.seed).permutation(np.setdiff1d(np.arange(len(x)), val))
    if len(trained) == 0:
        raise UserError("int8 export needs training rows to calibrate on; the train and transfer splits are empty")
    c = min(params.export.calibration_rows, max(1, len(trained) // 2))
    selection = trained[c:c + params.export.selection_rows]
    return x[trained[:c]], x[selection if len(selection) else trained[:c]]


def _qad(params: Params, workdir: Path, task: tasks.Task, splits: data.Splits, student_dir: Path,
         out: Path) -> dict[str, str]:
    """Fine-tune the student with int8 simulated, against the cached teacher, into `out`; checkpointed
    every epoch under the work directory, so a killed export resumes. Returns the lineage to tag."""
    rows = kd_rows(params, workdir, task, splits)
    record = search.read(student_dir)
    distill = search.chosen_setting(params.distill, record)
    model, spec = task.load(student_dir)
    simulated = qad.simulate(model)  # refuses a student whose int8 layers it cannot all simulate
    n = rows.extent(distill)
    cfg = FitConfig(params.export.qad_epochs, params.train.batch_size, params.export.qad_lr,
                    params.train.weight_decay, params.train.seed, params.train.device)
    weights = hashlib.sha256((student_dir / models.WEIGHTS_FILE).read_bytes()).hexdigest()
    code = hashlib.sha256(Path(qad.__file__).read_bytes()).hexdigest()
    inputs = {"student": weights, "qad": code, "export": params.export.model_dump(mode="json"),
              "distill": distill.model_dump(mode="json"), "cache": rows.keys,
              "train": params.train.model_dump(mode="json")}
    loss, soft = kd_objective(distill, rows)
    ckpt = checkpoint_path(workdir, params, "export", inputs, 1)
    resumed = checkpoint_epochs(ckpt)
    history = fit(model, rows.x[:n], rows.y[:n], loss, cfg, soft=soft, val=rows.val,
                  progress=progress.bar("quantization-aware fine-tune"), checkpoint=ckpt,
                  lengths=rows.lengths[:n] if rows.lengths is not None else None)
    qad.release(model)
    task.save(model, spec, out)
    setting = search.label(distill.alpha, distill.temperature, distill.loss)
    return {"cache_key": ",".join(rows.keys), "setting": setting, "qad_epochs": str(len(history)),
            "qad_resumed_after_epoch": str(resumed), "qad_simulated_layers": str(simulated),
            "qad_val_accuracy": f"{history[-1].get('val_accuracy', float('nan')):.4f}"}


def export_model(params: Params, workdir: Path, model_dir: Path, out: Path, metrics_file: Path,
                 version: int | None) -> ExportResult:
    """Export `model_dir` into `out` (replaced only on success; without the int8 file when the int8
    rules reject it), write `metrics_file` with their verdict, and attach both to `version` of the
    registered model when given. Shared by this stage and `kd export --version`."""
    task = tasks.for_params(params)
    splits = data.read_prepared(workdir / params.paths.prepared)
    x, y = task.inputs(splits.test, splits.schema), task.labels(splits.test, splits.schema)
    calibration, selection = int8_samples(params, task, splits)
    teacher = workdir / params.paths.teacher
    with tempfile.TemporaryDirectory() as tuned, atomic_dir(out) as tmp:
        lineage = None
        if params.export.int8 == "qad":
            lineage = _qad(params, workdir, task, splits, model_dir, Path(tuned))
        inputs = export.Int8Inputs(calibration, selection, params.export,
                                   Path(tuned) if lineage is not None else None, lineage)
        report = export.export_and_check(task, model_dir, x, y, tmp, inputs, teacher if teacher.is_dir() else None)
        decision = int8_decision(report, params)
        if decision.decision == "rejected":  # recorded, not shipped: the fp32 ONNX still is
            (tmp / export.INT8_FILE).unlink()
    discard_checkpoints(workdir, params, "export")
    accepted = decision.decision == "promoted"
    verdict = {"int8_policy": {"decision": "accepted" if accepted else "rejected", "shipped": accepted,
                               "reasons": list(decision.reasons)}}
    atomic_write_text(metrics_file, json.dumps(report.to_json() | verdict, indent=2) + "\n")
    if version is not None:
        _attach(params, workdir, version, report, decision, [("onnx", out), (params.paths.metrics, metrics_file)])
    return ExportResult(report, out, params.registry.model_name if version is not None else None, version,
                        tuple(r for r in decision.reasons if r.endswith("fail")))


def int8_decision(report: export.ExportReport, params: Params) -> policy.Decision:
    """The policy's int8 rules on the test figures of the int8 file against the fp32 student's."""
    s = report.student
    pt, q = s["pytorch"], s["onnx_int8"]
    perplexity = (pt.perplexity, q.perplexity) if pt.perplexity and q.perplexity else None
    return policy.decide_int8(pt.accuracy, q.accuracy, q.size_bytes, params.policy, perplexity)


def _attach(params: Params, workdir: Path, version: int, report: export.ExportReport, decision: policy.Decision,
            files: list[tuple[str, Path]]) -> None:
    from kd_core import tracking, versions  # mlflow loads only when there is a version to attach to

    metrics = tracking.flat_metrics({"export": report.to_json()}) if files else {}
    versions.attach_to_version(workdir, params.registry.model_name, version, version_tags(report, decision),
                               metrics, files)


def run(params: Params, workdir: Path) -> ExportResult:
    return export_model(params, workdir, workdir / params.paths.student, workdir / params.paths.onnx,
                        workdir / params.paths.metrics / OUTPUT_FILE, registered_version(params, workdir))

