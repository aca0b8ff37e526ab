"""export: the student as ONNX and int8 ONNX, checked against PyTorch -> artifacts/onnx, metrics/export.json.

The result is attached to the model version `register` wrote to metrics/register.json: tags on the
version (max logit difference, accuracy drop, size, latency) and the files on its run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kd_core import data, export, tasks
from kd_core.config import Params
from kd_core.fs import atomic_dir, atomic_write_text
from kd_core.stages._registered import registered_version

OUTPUT_FILE = "export.json"
TAGGED = ("size_bytes", "latency_ms_p50", "accuracy", "max_abs_logit_diff", "accuracy_drop")


@dataclass(frozen=True)
class ExportResult:
    report: export.ExportReport
    out: Path
    model_name: str | None = None
    version: int | None = None

    def summary(self) -> str:
        s = self.report.student
        pt, fp, q = s["pytorch"], s["onnx"], s["onnx_int8"]
        where = f"; attached to {self.model_name} version {self.version}" if self.version is not None else ""
        change = round(-q.accuracy_drop * 100, 1) + 0.0  # + 0.0: never print -0.0
        return (f"ONNX {fp.size_bytes / 1024:.0f} KiB (max |Δlogit| {fp.max_abs_logit_diff:.1g}), int8 "
                f"{q.size_bytes / 1024:.0f} KiB (accuracy {q.accuracy:.3f}, {change:+.1f} pts); "
                f"batch-1 latency PyTorch {pt.latency_ms_p50:.3f} / ONNX {fp.latency_ms_p50:.3f} / "
                f"int8 {q.latency_ms_p50:.3f} ms -> {self.out}{where}")


def version_tags(report: export.ExportReport) -> dict[str, str]:
    """The headline numbers as version tags: onnx.max_abs_logit_diff, onnx_int8.accuracy_drop, …"""
    return {f"{k}.{m}": f"{getattr(v, m):.6g}" for k, v in report.student.items() for m in TAGGED
            if not (k == "pytorch" and m in ("max_abs_logit_diff", "accuracy_drop"))}


def export_model(params: Params, workdir: Path, model_dir: Path, out: Path, metrics_file: Path,
                 version: int | None) -> ExportResult:
    """Export `model_dir` into `out` (replaced only on success), write `metrics_file`, and attach both
    to `version` of the registered model when given. Shared by this stage and `kd export --version`."""
    task = tasks.for_params(params)
    splits = data.read_prepared(workdir / params.paths.prepared)
    x, y = task.inputs(splits.test, splits.schema), task.labels(splits.test, splits.schema)
    teacher = workdir / params.paths.teacher
    with atomic_dir(out) as tmp:
        report = export.export_and_check(task, model_dir, x, y, tmp, teacher if teacher.is_dir() else None)
    atomic_write_text(metrics_file, json.dumps(report.to_json(), indent=2) + "\n")
    if version is not None:
        from kd_core import tracking, versions  # mlflow loads only when there is a version to attach to

        versions.attach_to_version(workdir, params.registry.model_name, version, version_tags(report),
                                   tracking.flat_metrics({"export": report.to_json()}),
                                   [("onnx", out), (params.paths.metrics, metrics_file)])
    return ExportResult(report, out, params.registry.model_name if version is not None else None, version)


def run(params: Params, workdir: Path) -> ExportResult:
    return export_model(params, workdir, workdir / params.paths.student, workdir / params.paths.onnx,
                        workdir / params.paths.metrics / OUTPUT_FILE, registered_version(params, workdir))
