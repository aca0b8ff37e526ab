"""The tables of the run's numbers, each built once: teacher / baseline / student metrics (eval.json),
shared by `kd run`'s summary, `kd compare` and the model card, and the edge export (export.json),
shared by `kd export` and the card, so no view can show a number another way. Pure: rows of strings;
rich renders them on the console, the card as markdown / HTML.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

ROLES = ("teacher", "baseline", "student")  # the reference, the control, the candidate
INT8 = "student int8 (ONNX)"


def kib(n: float) -> str:
    return f"{n / 1024:,.0f} KiB" if n >= 10 * 1024 else f"{n / 1024:,.1f} KiB"


def ms(v: float) -> str:
    return f"{v:.3f} ms"


def pts(fraction: float) -> str:
    """A change of accuracy in percentage points, signed; never '-0.0'."""
    return f"{round(fraction * 100, 1) + 0.0:+.1f} pts"


# (column header, eval.json key, format): the contract's key names, in the order every view shows them
COLUMNS: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    ("accuracy", "accuracy", lambda v: f"{v:.3f}"),
    ("ECE", "ece", lambda v: f"{v:.3f}"),
    ("NLL", "nll", lambda v: f"{v:.3f}"),
    ("agreement with teacher", "agreement_with_teacher", lambda v: f"{v:.3f}"),
    ("params", "params", lambda v: f"{v:,.0f}"),
    ("MACs", "macs", lambda v: f"{v:,.0f}"),
    ("size", "size_bytes", kib),
    ("latency p50 (batch 1, CPU)", "latency_ms_p50", ms),
)
LM_COLUMNS: tuple[tuple[str, str, Callable[[float], str]], ...] = (  # task lm's eval.json
    ("perplexity", "perplexity", lambda v: f"{v:.2f}"),
    ("next-token accuracy", "accuracy", lambda v: f"{v:.3f}"),
    ("agreement with teacher", "agreement_with_teacher", lambda v: f"{v:.3f}"),
    ("KL to teacher (nats/token)", "kl_to_teacher", lambda v: f"{v:.3f}"),
    ("params", "params", lambda v: f"{v:,.0f}"),
    ("MACs per token", "macs", lambda v: f"{v:,.0f}"),
    ("size", "size_bytes", kib),
    ("latency p50 (one token, CPU)", "latency_ms_p50", ms),
    ("tokens/s (greedy, batch 1)", "tokens_per_s", lambda v: f"{v:,.0f}"),
)


def is_lm(evals: dict) -> bool:
    """eval.json of `task: lm` (perplexity is its headline)."""
    return "perplexity" in evals.get("student", {})


@dataclass(frozen=True)
class MetricsTable:
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]  # one per model; "–" where a model lacks a metric (or has none to show)


def models_table(evals: dict, export: dict | None = None) -> MetricsTable:
    """One row per model of eval.json (and the int8 ONNX student of export.json, when there is one)."""
    models = [(r, evals[r]) for r in ROLES]
    int8 = (export or {}).get("student", {}).get("onnx_int8")
    if int8:
        models.append((INT8, int8))
    columns = LM_COLUMNS if is_lm(evals) else COLUMNS
    rows = tuple((name, *(fmt(m[key]) if key in m else "–" for _, key, fmt in columns)) for name, m in models)
    return MetricsTable(("model", *(label for label, _, _ in columns)), rows)


RUNTIMES = {"pytorch": "PyTorch (fp32)", "onnx": "ONNX Runtime (fp32)", "onnx_int8": "ONNX Runtime (int8)"}


def export_table(export: dict) -> MetricsTable:
    """One row per model and runtime of export.json; the PyTorch rows are the reference, so their
    differences to PyTorch are "–"."""
    rows = []
    lm = "perplexity" in export.get("student", {}).get("pytorch", {})
    for role in ("teacher", "student"):
        for k, v in export.get(role, {}).items():
            vs_pytorch = ("–", "–", "–", "–") if k == "pytorch" else (
                f"{v['max_abs_logit_diff']:.2g}", f"{v.get('mean_abs_logit_diff', float('nan')):.2g}",
                f"{v['agreement_with_pytorch']:.3f}", pts(-v["accuracy_drop"]))
            quality = f"{v['perplexity']:.2f}" if lm else f"{v['accuracy']:.3f}"
            rows.append((f"{role}, {RUNTIMES.get(k, k)}", kib(v["size_bytes"]), ms(v["latency_ms_p50"]),
                         quality, *vs_pytorch))
    same = "same next token as PyTorch" if lm else "same class as PyTorch"
    return MetricsTable(("model, runtime", "file size", "latency p50 (batch 1)", "perplexity" if lm else "accuracy",
                         "max abs. logit diff vs PyTorch", "mean abs. logit diff", same,
                         "next-token accuracy vs PyTorch" if lm else "accuracy vs PyTorch"), tuple(rows))


@dataclass(frozen=True)
class Ratios:
    """The student against the teacher and the baseline: what every summary says, computed once."""

    kept: float  # student accuracy / teacher accuracy (lm: teacher perplexity / student perplexity)
    macs: float  # teacher MACs / student MACs
    latency: float  # teacher latency / student latency
    size: float  # teacher weights / student weights
    gain: float  # student accuracy - baseline accuracy (lm: baseline perplexity - student perplexity)


def ratios(evals: dict) -> Ratios:
    t, b, s = (evals[r] for r in ROLES)
    kept, gain = ((t["perplexity"] / s["perplexity"], b["perplexity"] - s["perplexity"]) if is_lm(evals)
                  else (s["accuracy"] / t["accuracy"], s["accuracy"] - b["accuracy"]))
    return Ratios(kept, t["macs"] / max(s["macs"], 1), t["latency_ms_p50"] / s["latency_ms_p50"],
                  t["size_bytes"] / s["size_bytes"], gain)


def headline(evals: dict) -> str:
    """The sentence every view leads with: what the student keeps and what distillation adds."""
    r = ratios(evals)
    if is_lm(evals):
        s, b = evals["student"]["perplexity"], evals["baseline"]["perplexity"]
        return (f"the student's perplexity is {s:.2f} ({r.kept * 100:.1f} % of the teacher's quality, teacher / "
                f"student perplexity) with 1/{r.macs:.1f} of its MACs per token; distillation takes it from "
                f"{b:.2f} (the same network trained on the text alone) to {s:.2f}")
    return (f"the student keeps {r.kept * 100:.1f} % of the teacher's accuracy with 1/{r.macs:.1f} of its MACs "
            f"and {r.latency:.1f}× lower latency; distillation adds {r.gain * 100:+.1f} points over the "
            "hard-label baseline")
