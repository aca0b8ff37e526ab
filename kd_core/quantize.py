"""int8 ONNX for edge runtimes: calibrated static QDQ, the recipe chosen by measurement on training rows.

Static quantization (ONNX Runtime QDQ: int8 per-channel weights, uint8 activations whose ranges are
calibrated on a sample of the rows the student trained on) runs integer kernels end to end, where
dynamic quantization re-measures every activation at run time. Which calibration method clips best
is data-dependent, so every method in `export.methods` is tried and scored on *other* training rows
against the fp32 model.
Two repairs are measured with every static method: the graph's first and last weight layers kept in
float (the input standardisation feeds the first, the logits leave the last: the two layers whose
error the rest of the network cannot absorb), and uint16 activations with int8 weights (the file
stays a third of fp32; rounding activations is what costs most on small students). Weight-only
dynamic forms are always measured too (transformers lose to static activation ranges what they keep
with these), also with the edge layers in float (a language model's output projection scores every
token of its vocabulary). Among recipes that reach `export.min_agreement`, those within
`export.max_size_ratio` of the fp32 file first, the one with the smallest mean |Δlogit| ships. The
test split is never seen here: the export stage scores the chosen file on it afterwards.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kd_core.errors import UserError

STATIC = ("minmax", "entropy", "percentile")  # ONNX Runtime's calibrators (CalibrationMethod)
# Weight-only int8 with activations quantized at run time, always tried: `dynamic` is ONNX Runtime's default
# op set (MatMul, Gemm, Gather: embeddings too); `dynamic_matmul` quantizes only the MatMul/Gemm weights
# and leaves LayerNorm, Softmax, GELU and the embeddings in float — the form that keeps a transformer's
# accuracy where static activation ranges cannot (attention probabilities, LayerNorm outputs).
DYNAMIC = {"dynamic": None, "dynamic_matmul": ["MatMul", "Gemm"]}
WEIGHT_OPS = ("MatMul", "Gemm", "Conv")  # the ops whose weights carry the model's size
CALIBRATION_BATCH = 32  # rows per calibration pass (fewer where a pass's logits would pass the scoring batch:
# lm, 2 sequences); every pass the same shape (histograms need it); minmax ranges do not depend on it

Open = Callable[[Path], Callable[[np.ndarray], np.ndarray]]  # an ONNX file -> (inputs (n, ...) -> logits (n·P, K))


@dataclass
class Diff:
    """|Δlogit| and top-1 agreement of a model against a reference, summed a batch at a time so that no
    whole-split logit array is ever held (lm: 32 sequences x 128 positions x 49,152 classes is 805 MB)."""

    rows: int = 0  # logit rows (lm: positions)
    agree: int = 0  # rows whose top-1 class is the reference's
    max_abs: float = 0.0
    abs_sum: float = 0.0  # sum over batches of mean |Δlogit| x values: one batch gives back its mean exactly
    values: int = 0

    def add(self, logits: np.ndarray, ref: np.ndarray) -> None:
        """One batch: logits (n, K) and the reference's (n, K)."""
        if not len(logits):
            return
        diff = logits - ref
        np.abs(diff, out=diff)
        self.rows, self.agree = self.rows + len(logits), self.agree + int((logits.argmax(-1) == ref.argmax(-1)).sum())
        self.max_abs = float(np.max([self.max_abs, diff.max()]))  # a NaN stays: the export check fails
        self.abs_sum, self.values = self.abs_sum + float(diff.mean()) * diff.size, self.values + diff.size

    @property
    def agreement(self) -> float:
        return self.agree / max(self.rows, 1)

    @property
    def mean_abs(self) -> float:
        return self.abs_sum / max(self.values, 1)


@dataclass(frozen=True)
class Candidate:
    """One int8 recipe and how close it came to the fp32 model on the selection rows."""

    method: str  # dynamic | dynamic_matmul | minmax | entropy | percentile
    kept_float: tuple[str, ...]  # graph nodes left in float
    activations: str  # uint8, or uint16 (weights are int8 either way); dynamic: quantized at run time
    agreement: float  # share of selection positions whose class is the fp32 model's
    mean_abs_logit_diff: float
    max_abs_logit_diff: float
    size_bytes: int
    error: str | None = None  # the recipe could not be applied to this graph (then never chosen)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None} | {"kept_float": list(self.kept_float)}


def weight_nodes(path: Path) -> list[str]:
    """Names of the nodes that hold weights (MatMul/Gemm/Conv with a constant input), in graph order."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    consts = {t.name for t in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type in WEIGHT_OPS and any(i in consts for i in n.input)]


def _reader(name: str, rows: np.ndarray, batch: int):  # -> onnxruntime.quantization.CalibrationDataReader
    from onnxruntime.quantization import CalibrationDataReader

    batch = min(batch, len(rows))
    batches = [{name: rows[i:i + batch]} for i in range(0, len(rows) - batch + 1, batch)]

    class Rows(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(batches)

        def get_next(self) -> dict | None:
            return next(self._it, None)

    return Rows()


def _preprocessed(src: Path, dst: Path) -> Path:
    """ONNX Runtime's pre-processing (shape inference, graph fusions) before calibration, as its docs
    ask; a graph it cannot infer (some transformer shapes) is quantized as exported."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
        return dst
    except Exception:  # noqa: BLE001 - pre-processing is an optimisation; its failure is not the user's
        return src


def quantize(src: Path, dst: Path, method: str, input_name: str, calibration: np.ndarray,
             kept_float: tuple[str, ...] = (), activations: str = "uint8", batch: int = CALIBRATION_BATCH) -> None:
    """Write `dst`, the int8 form of `src` by one recipe: a DYNAMIC one, or a static QDQ calibrator that
    reads the calibration rows `batch` at a time (ONNX Runtime holds one pass's outputs, logits included)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    if method in DYNAMIC:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True,
                         nodes_to_exclude=list(kept_float), op_types_to_quantize=DYNAMIC[method])
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = _preprocessed(src, Path(tmp) / "pre.onnx")
        quantize_static(str(model), str(dst), _reader(input_name, calibration, batch), quant_format=QuantFormat.QDQ,
                        per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt16 if activations == "uint16" else QuantType.QUInt8,
                        calibrate_method=getattr(CalibrationMethod, {"minmax": "MinMax"}.get(method, method.title())),
                        nodes_to_exclude=list(kept_float), extra_options={"CalibTensorRangeSymmetric": False})


def _batches(rows: np.ndarray, step: int) -> list[np.ndarray]:
    return [rows[i:i + step] for i in range(0, len(rows), step)]


def _reference(predict: Callable[[np.ndarray], np.ndarray], batches: list[np.ndarray], folder: Path) -> list[Path]:
    """The fp32 model's logits on the selection rows, one .npy file per batch in `folder`: the fp32 model
    runs once, and each recipe is compared with them a batch at a time, never the whole (S·P, K) array."""
    files = [folder / f"reference.{i}.npy" for i in range(len(batches))]
    for file, rows in zip(files, batches, strict=True):
        np.save(file, predict(rows))
    return files


def _score(plan: tuple[str, tuple[str, ...], str], path: Path, reference: list[Path], open_: Open,
           batches: list[np.ndarray]) -> Candidate:
    predict, diff = open_(path), Diff()
    for file, rows in zip(reference, batches, strict=True):
        diff.add(predict(rows), np.load(file))
    activations = "dynamic" if plan[0] in DYNAMIC else plan[2]
    return Candidate(plan[0], plan[1], activations, diff.agreement, diff.mean_abs, diff.max_abs, path.stat().st_size)


def _failed(plan: tuple[str, tuple[str, ...], str], exc: Exception) -> Candidate:
    """A recipe the quantizer refused (e.g. a histogram calibrator on a constant tensor), kept on record."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return Candidate(plan[0], plan[1], plan[2], 0.0, float("inf"), float("inf"), 0, f"{type(exc).__name__}: {first}")


def _best(candidates: list[Candidate], min_agreement: float, max_size: float) -> Candidate:
    """Of those agreeing enough with fp32, the ones within the size budget if any; else the agreeing
    ones whatever their size (a bigger file that keeps the student's answers beats a small one that
    does not); else all. Among them the smallest mean |Δlogit|: agreement saturates on training rows
    the student is sure of; the logit error does not."""
    candidates = [c for c in candidates if c.error is None]
    agreeing = [c for c in candidates if c.agreement >= min_agreement]
    pool = [c for c in agreeing if c.size_bytes <= max_size] or agreeing or candidates
    return min(pool, key=lambda c: (c.mean_abs_logit_diff, -c.agreement, c.size_bytes))


def choose_int8(src: Path, dst: Path, methods: tuple[str, ...], input_name: str, calibration: np.ndarray,
                selection: np.ndarray, reference: Path, open_: Open, batch_rows: int, min_agreement: float,
                max_size_ratio: float) -> tuple[Candidate, list[Candidate]]:
    """Quantize `src` by every recipe, keep the one closest to `reference` (the fp32 student's ONNX file)
    on the `selection` rows as `dst`; return it and all tried. `calibration` and `selection` are disjoint
    samples of training rows (N, ...); `src` may be a fine-tune of the fp32 student. Each file is opened
    once with `open_` and scored `batch_rows` rows at a time."""
    if len(calibration) == 0 or len(selection) == 0:
        raise UserError("int8 export needs training rows to calibrate on and to choose a recipe with; "
                        "the train and transfer splits are empty")
    nodes = weight_nodes(src)
    edges = tuple(dict.fromkeys([nodes[0], nodes[-1]])) if nodes else ()
    static = [m for m in methods if m not in DYNAMIC]
    plans = [(m, (), "uint8") for m in static] + [(m, edges, "uint8") for m in static if edges] + [
        (m, (), "uint16") for m in static] + [(m, kept, "dynamic") for m in DYNAMIC for kept in {(): 0, edges: 0}]
    tried: list[Candidate] = []
    batches = _batches(selection, max(1, batch_rows))
    with tempfile.TemporaryDirectory() as tmp:
        ref = _reference(open_(reference), batches, Path(tmp))
        files: list[Path] = []
        for plan in plans:
            path = Path(tmp) / f"{len(tried)}.onnx"
            try:
                quantize(src, path, plan[0], input_name, calibration, plan[1], plan[2],
                         min(CALIBRATION_BATCH, max(1, batch_rows)))
            except Exception as exc:  # noqa: BLE001 - the quantizer raises many types; the recipe is out
                tried.append(_failed(plan, exc))
            else:
                tried.append(_score(plan, path, ref, open_, batches))
            files.append(path)
        if all(c.error for c in tried):
            raise UserError(f"no int8 recipe applies to {src.name}: {tried[0].method}: {tried[0].error}")
        best = _best(tried, min_agreement, max_size_ratio * src.stat().st_size)
        shutil.copyfile(files[tried.index(best)], dst)
    return best, tried
