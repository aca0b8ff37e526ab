"""Edge export: a kd model as ONNX and as int8 ONNX, checked against PyTorch and timed on CPU.

The exported graph is the whole model as its task loads it: a table model with its standardisation,
fed raw rows in the model's feature order (`model.json`); a text model fed padded token ids of its
own tokenizer (dynamic batch and sequence axes). Either returns logits over the model's classes. int8 is
the recipe kd_core.quantize chooses on training rows (calibrated static QDQ by default), made from the
student itself or from its quantization-aware fine-tune (kd_core.qad); either way it is compared with
the fp32 student that was registered. No MLflow here: the stage logs the result.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kd_core import models, quantize
from kd_core.config import ExportParams
from kd_core.errors import UserError
from kd_core.evaluate import interleaved_medians_ms
from kd_core.tasks import Task

ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
OUTPUT = "logits"  # (B, K); the input is the task's: `features` (B, F) rows or `input_ids` (B, L) tokens
ONNX_BATCH = 256  # rows per ONNX Runtime call when scoring a split
FP32_TOLERANCE = 1e-3  # fp32 ONNX may differ from PyTorch only by float reordering (~1e-5 seen)
CHUNK_LOGITS = 1 << 24  # logits per array while the test rows are scored (64 MB of float32): a classifier's
# test split is one chunk; lm: a few sequences (49,152 classes x 128 positions: 2 sequences)


@dataclass(frozen=True)
class Variant:
    """One runtime of one model on the test rows; diffs are against the same model in PyTorch."""

    size_bytes: int
    latency_ms_p50: float
    accuracy: float
    max_abs_logit_diff: float = 0.0
    mean_abs_logit_diff: float = 0.0
    agreement_with_pytorch: float = 1.0  # share of rows whose predicted class is PyTorch's
    accuracy_drop: float = 0.0  # PyTorch accuracy - this accuracy (positive = worse)
    perplexity: float | None = None  # `lm`: on the held-out sequences (accuracy is next-token top-1)


@dataclass(frozen=True)
class Int8Recipe:
    """How the int8 file was made: from which weights, by which recipe, chosen among which."""

    source: str  # "student" (post-training quantization) or "qad" (the quantization-aware fine-tune)
    chosen: quantize.Candidate
    tried: tuple[quantize.Candidate, ...]
    calibration_rows: int
    selection_rows: int
    lineage: dict[str, str] | None = None  # qad: the cache key and distillation setting it trained with

    def to_json(self) -> dict:
        return {"source": self.source, **({"lineage": self.lineage} if self.lineage else {}),
                "method": self.chosen.method, "kept_float": list(self.chosen.kept_float),
                "activations": self.chosen.activations,
                "calibration_rows": self.calibration_rows, "selection_rows": self.selection_rows,
                "candidates": [c.to_json() for c in self.tried]}


@dataclass(frozen=True)
class Int8Inputs:
    """What the int8 export needs besides the model: disjoint samples of training rows, the settings,
    and the weights to quantize when they are not the student's own (`export.int8: qad`)."""

    calibration: np.ndarray  # (C, ...) training rows the activation ranges are calibrated on
    selection: np.ndarray  # (S, ...) other training rows the recipe is chosen on
    settings: ExportParams
    weights_dir: Path | None = None  # a fine-tuned copy of the student to quantize instead
    lineage: dict[str, str] | None = None  # what made that copy (recorded with the recipe)


@dataclass(frozen=True)
class ExportReport:
    student: dict[str, Variant]  # pytorch, onnx, onnx_int8
    teacher: dict[str, Variant]  # pytorch, onnx (empty when no teacher was given)
    rows: int
    threads: int
    int8: Int8Recipe

    def to_json(self) -> dict:
        """metrics/export.json: the same metric names as eval.json (accuracy, latency_ms_p50, size_bytes)."""
        return {"student": {k: _fields(v) for k, v in self.student.items()},
                "teacher": {k: _fields(v) for k, v in self.teacher.items()},
                "rows": self.rows, "threads": self.threads, "int8": self.int8.to_json(),
                "runtime": {"onnxruntime": version("onnxruntime"), "onnx": version("onnx"),
                            "torch": torch.__version__}}


def _fields(v: Variant) -> dict:
    return {k: x for k, x in asdict(v).items() if x is not None}  # perplexity only where there is one


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter and the quantizer chat on stdout, the root logger and warnings; the CLI owns those."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir", "")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def to_onnx(model: nn.Module, task: Task, spec: models.ModelSpec, path: Path) -> None:
    """Export with the task's dynamic axes (batch; text: also sequence) into one self-contained file."""
    model.eval()
    example = task.example(spec, batch=2)  # B = 2 so the exporter cannot specialise on 1
    if 1 in task.dynamic_axes and example.shape[1] == 1:  # nor on a one-token sequence (lm's example)
        example = example.repeat(1, 8)
    args = (example,)
    dims = {a: torch.export.Dim(("batch", "sequence")[a] if a < 2 else f"axis{a}") for a in task.dynamic_axes}
    try:
        with _quiet():
            torch.onnx.export(model, args, str(path), input_names=[task.input_name], output_names=[OUTPUT],
                              dynamic_shapes=(dims,), dynamo=True, external_data=False, verbose=False)
    except Exception as exc:  # the exporter raises many types; any of them means "not exportable"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot export {type(model.net).__name__ if hasattr(model, 'net') else 'model'} "
                        f"to ONNX: {first[:300]}") from None
    check(path)


def check(path: Path) -> None:
    """ONNX's own checker (graph, types, opsets, shape inference) on a written file: a model that runs in
    ONNX Runtime may still be invalid for other runtimes, which are what an edge export is for."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise UserError(f"{path.name}: not a valid ONNX model: {str(exc).strip().splitlines()[0][:300]}") from None


def make_int8(task: Task, fp32: Path, dst: Path, inputs: Int8Inputs, threads: int, classes: int) -> Int8Recipe:
    """Write `dst`: the int8 recipe that agrees best with `fp32` on the selection rows (kd_core.quantize),
    scored about CHUNK_LOGITS logits at a time (`classes`: the model's K); with `inputs.weights_dir`, the
    recipe is applied to that model's ONNX export instead."""
    cfg, src = inputs.settings, fp32
    methods = ("dynamic",) if cfg.int8 == "dynamic" else cfg.methods
    with tempfile.TemporaryDirectory() as tmp:
        if inputs.weights_dir is not None:
            tuned, tuned_spec = task.load(inputs.weights_dir)
            src = Path(tmp) / ONNX_FILE
            to_onnx(tuned, task, tuned_spec, src)
        per = task.positions(inputs.selection)
        with _quiet():
            best, tried = quantize.choose_int8(
                src, dst, methods, task.input_name, inputs.calibration, inputs.selection, fp32,
                lambda path: functools.partial(_run_onnx, session(path, threads), positions=per),
                chunk_rows(per, classes), cfg.min_agreement, cfg.max_size_ratio)
    check(dst)
    return Int8Recipe("qad" if inputs.weights_dir is not None else "student", best, tuple(tried),
                      len(inputs.calibration), len(inputs.selection), inputs.lineage)


def session(path: Path, threads: int):  # -> onnxruntime.InferenceSession
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1  # as many threads as PyTorch uses
    opts.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _run_onnx(sess, x: np.ndarray, positions: int = 1) -> np.ndarray:
    """Logits of every row, one row of logits per cache row (`lm`: rows of P positions, scored
    ONNX_BATCH positions at a time).  # (N, ...) -> (N·P, K)"""
    name, step = sess.get_inputs()[0].name, max(1, ONNX_BATCH // positions)
    out = [sess.run([OUTPUT], {name: x[i:i + step]})[0] for i in range(0, len(x), step)]
    return np.concatenate([o.reshape(-1, o.shape[-1]) for o in out])


def _torch_call(model: nn.Module, example: torch.Tensor) -> Callable[[], object]:
    """Batch-1 forward on the task's example; call it under torch.inference_mode(), as evaluate does."""
    model.eval()
    return lambda: model(example)


def _onnx_call(sess, example: torch.Tensor) -> Callable[[], object]:
    x, name = example.numpy(), sess.get_inputs()[0].name
    return lambda: sess.run([OUTPUT], {name: x})


def chunk_rows(positions: int, classes: int) -> int:
    """Input rows per scoring step: about CHUNK_LOGITS logits per array, at least one row."""
    return max(1, CHUNK_LOGITS // max(1, positions * classes))


@dataclass
class _Tally:
    """One runtime's figures on the test rows, summed chunk by chunk so that memory does not grow with the
    test set (lm: 4,096 tokens x 49,152 classes is 805 MB of logits per array); diffs are against PyTorch."""

    rows: int = 0
    correct: int = 0
    diff: quantize.Diff = field(default_factory=quantize.Diff)
    nll: float = 0.0  # lm: summed NLL of the targets

    def add(self, logits: np.ndarray, y: np.ndarray, ref: np.ndarray | None, lm: bool) -> None:
        """One chunk: logits (n, K) of cache rows with targets y (n,), and PyTorch's (n, K) unless this is it."""
        self.rows, self.correct = self.rows + len(y), self.correct + int((logits.argmax(1) == y).sum())
        if ref is not None:
            self.diff.add(logits, ref)
        if lm:
            self.nll += _nll_sum(logits, y)

    @property
    def accuracy(self) -> float:
        return self.correct / self.rows if self.rows else float("nan")


def _nll_sum(logits: np.ndarray, y: np.ndarray) -> float:
    """Summed NLL of the targets, for `lm`'s perplexity = exp(NLL / tokens).  # (n, K), (n,)"""
    z = torch.from_numpy(logits).float()
    nll = -torch.log_softmax(z, dim=-1).gather(-1, torch.from_numpy(y)[:, None].long())[:, 0]
    return float(nll.double().sum())


def _compare(t: _Tally, ref: _Tally | None, size: int, latency: float, lm: bool) -> Variant:
    """The Variant of a tally; `ref` (PyTorch's tally) for a runtime compared with PyTorch, else None."""
    ppl = float(np.exp(t.nll / max(t.rows, 1))) if lm else None
    if ref is None:
        return Variant(size, latency, t.accuracy, perplexity=ppl)
    return Variant(size, latency, t.accuracy, t.diff.max_abs, t.diff.mean_abs, t.diff.agree / max(t.rows, 1),
                   ref.accuracy - t.accuracy, ppl)


def _score(task: Task, model: nn.Module, sessions: dict, x: np.ndarray, y: np.ndarray, classes: int) -> dict:
    """PyTorch's and each ONNX session's tally on the test inputs x (N, ...) with targets y (N·P,), a few rows
    at a time (about CHUNK_LOGITS logits per array): {"pytorch": _Tally, **{session name: _Tally}}."""
    per, lm = task.positions(x), task.lower_is_better  # lower-is-better headline: perplexity
    step = chunk_rows(per, classes)
    tallies = {k: _Tally() for k in ("pytorch", *sessions)}
    for i in range(0, len(x), step):
        rows, targets = x[i:i + step], y[i * per:(i + step) * per]
        ref = task.predict_logits(model, rows)  # (n·P, K)
        tallies["pytorch"].add(ref, targets, None, lm)
        for k, sess in sessions.items():
            tallies[k].add(_run_onnx(sess, rows, per), targets, ref, lm)
    return tallies


def export_and_check(task: Task, student_dir: Path, x: np.ndarray, y: np.ndarray, out: Path, int8: Int8Inputs,
                     teacher_dir: Path | None = None) -> ExportReport:
    """Write `out/model.onnx` and `out/model.int8.onnx` for the student in `student_dir`, check both
    against PyTorch on the task's test inputs `x` (N, ...) with class indices `y` (N,) (`lm`: next tokens
    (N, L), compared per position), and time batch-1 CPU
    inference of every variant (the teacher too, in PyTorch and fp32 ONNX, when `teacher_dir` is given).
    The test rows are scored a chunk at a time, so memory stays flat however large the test set."""
    if len(x) == 0:
        raise UserError("export needs test rows to check the ONNX models against PyTorch; the test split is empty")
    threads, y = torch.get_num_threads(), y.reshape(-1)  # one label per cache row
    out.mkdir(parents=True, exist_ok=True)
    student, spec = task.load(student_dir)
    example = task.example(spec)  # (1, ...): batch-1 timing input
    lm, classes = task.lower_is_better, len(spec.schema.classes)
    to_onnx(student, task, spec, out / ONNX_FILE)
    recipe = make_int8(task, out / ONNX_FILE, out / INT8_FILE, int8, threads, classes)
    sessions = {"onnx": session(out / ONNX_FILE, threads), "onnx_int8": session(out / INT8_FILE, threads)}
    tallies = _score(task, student, sessions, x, y, classes)
    fp32_diff = tallies["onnx"].diff.max_abs
    if not fp32_diff <= FP32_TOLERANCE:
        raise UserError(f"the ONNX export of {student_dir} disagrees with PyTorch: max |logit difference| "
                        f"{fp32_diff:.3g} > {FP32_TOLERANCE}; the architecture uses an op the exporter mistranslates")
    calls = {"student.pytorch": _torch_call(student, example),
             **{f"student.{k}": _onnx_call(s, example) for k, s in sessions.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        if teacher_dir is not None:
            teacher, teacher_spec = task.load(teacher_dir)
            to_onnx(teacher, task, teacher_spec, Path(tmp) / ONNX_FILE)
            teacher_sess = session(Path(tmp) / ONNX_FILE, threads)
            teacher_example = task.example(teacher_spec)
            calls |= {"teacher.pytorch": _torch_call(teacher, teacher_example),
                      "teacher.onnx": _onnx_call(teacher_sess, teacher_example)}
            teacher_tallies = _score(task, teacher, {"onnx": teacher_sess}, x, y, len(teacher_spec.schema.classes))
            teacher_size = (Path(tmp) / ONNX_FILE).stat().st_size
        with torch.inference_mode():
            ms = interleaved_medians_ms(calls)
    pt = tallies["pytorch"]
    variants = {"pytorch": _compare(pt, None, (student_dir / models.WEIGHTS_FILE).stat().st_size,
                                    ms["student.pytorch"], lm), **{
        k: _compare(tallies[k], pt, (out / (ONNX_FILE if k == "onnx" else INT8_FILE)).stat().st_size,
                    ms[f"student.{k}"], lm) for k in sessions}}
    teacher_variants: dict[str, Variant] = {}
    if teacher_dir is not None:
        tt = teacher_tallies["pytorch"]
        teacher_variants = {
            "pytorch": _compare(tt, None, (teacher_dir / models.WEIGHTS_FILE).stat().st_size,
                                ms["teacher.pytorch"], lm),
            "onnx": _compare(teacher_tallies["onnx"], tt, teacher_size, ms["teacher.onnx"], lm)}
    return ExportReport(variants, teacher_variants, len(x), threads, recipe)
