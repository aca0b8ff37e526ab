"""The promotion policy: pure functions of eval.json and a paired comparison with the champion.

No MLflow here, so every rule is unit-tested without a tracking store; `kd_core.registry` gathers the
evidence, asks `decide_promotion` and records the outcome. Metric keys are eval.json's own names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from kd_core.config import PolicyParams
from kd_core.errors import UserError

ACCURACY, PER_CLASS = "accuracy", "per_class_accuracy"  # eval.json keys the policy reads; the same
PERPLEXITY = "perplexity"  # task lm's headline: lower is better
LATENCY, SIZE = "latency_ms_p50", "size_bytes"              # names everywhere (eval.json, MLflow, tags)
RULES = ("teacher_retention", "gain_over_baseline", "latency_ratio", "size_bytes", "class_drop",
         "gain_over_champion", "champion_p_value")

_EPS = 1e-9  # accuracies are ratios of counts: 0.3 - 0.2 must still reach a 0.1 threshold


@dataclass(frozen=True)
class Decision:
    decision: Literal["promoted", "rejected"]
    reasons: tuple[str, ...]  # one per rule, in RULES order: "rule value <= or >= threshold: pass|fail"


@dataclass(frozen=True)
class ChampionScore:
    """The champion and the candidate scored on the same rows of today's test split (paired)."""

    version: int
    accuracy: float  # the champion's accuracy on today's test rows, not its old metrics
    per_class_accuracy: dict[str, float]  # the champion's, keyed by class name like eval.json
    wins: int  # rows the candidate classifies right and the champion wrong (lm: sequences it predicts better)
    losses: int  # rows the champion classifies right and the candidate wrong (lm: sequences it predicts worse)
    perplexity: float | None = None  # lm: the champion's perplexity on today's held-out sequences
    incomparable: str | None = None  # why the champion cannot score today's rows (lm: another tokenizer)


def paired_score(version: int, candidate: np.ndarray, champion: np.ndarray, labels: np.ndarray) -> ChampionScore:
    """Row-by-row comparison of two models' predicted class names against the true labels, (N,) each."""
    y = np.asarray(labels, dtype=object)
    cand_ok = np.asarray(candidate, dtype=object) == y  # (N,) bool
    champ_ok = np.asarray(champion, dtype=object) == y  # (N,) bool
    per_class = {str(c): float(champ_ok[y == c].mean()) for c in pd.unique(y)}
    return ChampionScore(version, float(champ_ok.mean()) if len(y) else 0.0, per_class,
                         int((cand_ok & ~champ_ok).sum()), int((~cand_ok & champ_ok).sum()))


def paired_nll(version: int, candidate: np.ndarray, champion: np.ndarray, tokens: int,
               champion_accuracy: float) -> ChampionScore:
    """Sequence-by-sequence comparison of two language models' summed NLL on the same held-out
    sequences, (N,) each: a win is a sequence the candidate predicts better (a sign test, like McNemar's)."""
    cand, champ = np.asarray(candidate, dtype=np.float64), np.asarray(champion, dtype=np.float64)
    return ChampionScore(version, champion_accuracy, {}, int((cand < champ).sum()), int((cand > champ).sum()),
                         float(np.exp(champ.sum() / max(tokens, 1))))


def mcnemar_p_value(wins: int, losses: int) -> float:
    """One-sided exact McNemar test: P(X >= wins) for X ~ Binomial(wins + losses, 1/2).

    Only the discordant rows carry information about which of two models is more accurate on the
    same rows; if both were equally accurate each of them would be a coin flip (McNemar 1947; the
    exact binomial form is the one to use when discordant rows are few). 1.0 when there are none.
    """
    n = wins + losses
    return 1.0 if n == 0 else float(binomtest(wins, n, 0.5, alternative="greater").pvalue)


def _number(metrics: dict, key: str, role: str, lo: float = 0.0, hi: float = math.inf) -> float:
    """A metric from eval.json; missing or malformed is an error, never a silent 0."""
    if key not in metrics:
        raise UserError(f"{role} metrics lack {key!r} (have {sorted(metrics)[:8]})")
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        what = "a fraction in [0, 1]" if (lo, hi) == (0.0, 1.0) else f"a number >= {lo:g}"
        raise UserError(f"{role} {key} must be {what}, got {value!r}")
    return float(value)


def accuracy(metrics: dict, role: str) -> float:
    return _number(metrics, ACCURACY, role, 0.0, 1.0)


def _per_class(metrics: dict, role: str) -> dict[str, float]:
    value = metrics.get(PER_CLASS)
    if not isinstance(value, dict):
        raise UserError(f"{role} metrics lack {PER_CLASS!r} (a mapping of class name to accuracy)")
    return {str(c): _number(value, c, f"{role} {PER_CLASS}", 0.0, 1.0) for c in value}


def _at_least(name: str, value: float, threshold: float, detail: str = "") -> tuple[bool, str]:
    ok = value >= threshold - _EPS
    return ok, f"{name} {value:.4f}{detail} >= {threshold:.4f}: {'pass' if ok else 'fail'}"


def _at_most(name: str, value: float, threshold: float, detail: str = "", fmt: str = ".4f") -> tuple[bool, str]:
    ok = value <= threshold + _EPS
    return ok, f"{name} {value:{fmt}}{detail} <= {threshold:{fmt}}: {'pass' if ok else 'fail'}"


def _champion_checks(candidate: dict, student: float, champion: ChampionScore,
                     policy: PolicyParams) -> list[tuple[bool, str]]:
    vs = f" vs version {champion.version}"
    if champion.incomparable:  # nothing shows the candidate beats it: rejected, with the reason; promote by hand
        why = f"version {champion.version} not comparable: {champion.incomparable}"
        return [(True, f"{RULES[4]} n/a ({why}): pass"), (False, f"{RULES[5]} {why}: fail"),
                (True, f"{RULES[6]} n/a ({why}): pass")]
    p = mcnemar_p_value(champion.wins, champion.losses)
    significance = _at_most(RULES[6], p, policy.max_p_value, f" ({champion.wins} wins, {champion.losses} losses{vs})")
    if PERPLEXITY in candidate:  # a perplexity headline: points gained over the champion; no classes
        ppl = _number(candidate, PERPLEXITY, "student", 1.0)
        return [(True, f"{RULES[4]} n/a (a language model has no classes): pass"),
                _at_least(RULES[5], (champion.perplexity or math.inf) - ppl, policy.min_gain_over_champion,
                          f" (perplexity{vs})"),
                significance]
    mine = _per_class(candidate, "student")
    missing = sorted(set(champion.per_class_accuracy) - set(mine))
    if missing:
        raise UserError(f"student {PER_CLASS} lacks class(es) {missing[:5]} of today's test split")
    drops = {c: acc - mine[c] for c, acc in champion.per_class_accuracy.items()}  # > 0: the class got worse
    worst = max(drops, key=lambda c: drops[c])
    return [
        _at_most(RULES[4], drops[worst], policy.max_class_drop, f" (class {worst}{vs})"),
        _at_least(RULES[5], student - champion.accuracy, policy.min_gain_over_champion, vs),
        significance,
    ]


def _quality_checks(candidate: dict, teacher: dict, baseline: dict, policy: PolicyParams) -> list[tuple[bool, str]]:
    """Teacher retention and gain over the baseline, on the task's headline metric: accuracy, or for
    `lm` perplexity (retention = teacher / student perplexity; gain = baseline - student perplexity)."""
    if PERPLEXITY not in candidate:
        student = accuracy(candidate, "student")
        teacher_acc, baseline_acc = accuracy(teacher, "teacher"), accuracy(baseline, "baseline")
        return [_at_least(RULES[0], student / teacher_acc, policy.min_teacher_retention) if teacher_acc > 0
                else (False, f"{RULES[0]} undefined (teacher {ACCURACY} 0.0000): fail"),
                _at_least(RULES[1], student - baseline_acc, policy.min_gain_over_baseline)]
    student, t, b = (_number(m, PERPLEXITY, r, 1.0) for m, r in ((candidate, "student"), (teacher, "teacher"),
                                                                 (baseline, "baseline")))
    return [_at_least(RULES[0], t / student, policy.min_teacher_retention, " (teacher / student perplexity)"),
            _at_least(RULES[1], b - student, policy.min_gain_over_baseline, " (baseline - student perplexity)")]


def decide_promotion(candidate: dict, teacher: dict, baseline: dict, champion: ChampionScore | None,
                     policy: PolicyParams) -> Decision:
    """Promote only if every rule passes, in RULES order:

    the student keeps enough of the teacher's accuracy (`lm`: perplexity); beats the hard-label
    baseline (KD helped); is
    fast enough next to the teacher (batch-1 latencies timed interleaved in one process by
    kd_core.evaluate.batch1_latencies_ms, so machine noise hits both alike) and small enough; and,
    when a champion exists (scored on today's test rows, paired with the student), loses no class by
    more than the margin, beats it by at least epsilon, and the win is significant.
    """
    student = accuracy(candidate, "student")
    latency, teacher_latency = _number(candidate, LATENCY, "student"), _number(teacher, LATENCY, "teacher")
    size = _number(candidate, SIZE, "student")
    checks = [
        *_quality_checks(candidate, teacher, baseline, policy),
        _at_most(RULES[2], latency / teacher_latency, policy.max_latency_ratio) if teacher_latency > 0
        else (False, f"{RULES[2]} undefined (teacher {LATENCY} 0): fail"),
        _at_most(RULES[3], size, policy.max_size_bytes, fmt=".0f") if policy.max_size_bytes is not None
        else (True, f"{RULES[3]} n/a (no limit): pass"),
        *(_champion_checks(candidate, student, champion, policy) if champion is not None
          else [(True, f"{rule} n/a (no champion): pass") for rule in RULES[4:]]),
    ]
    decision: Literal["promoted", "rejected"] = "promoted" if all(ok for ok, _ in checks) else "rejected"
    return Decision(decision, tuple(reason for _, reason in checks))


INT8_RULES = ("int8_accuracy_drop", "int8_size_bytes", "int8_perplexity_increase")


def decide_int8(fp32_accuracy: float, int8_accuracy: float, int8_size: int, policy: PolicyParams,
                perplexity: tuple[float, float] | None = None) -> Decision:
    """Whether the int8 edge model may ship beside the registered fp32 student: it loses at most
    `max_int8_accuracy_drop` of the fp32 student's test accuracy, its file fits `max_int8_size_bytes`
    and (`lm`: `perplexity` = (fp32, int8)) its perplexity grows at most `max_int8_perplexity_increase`
    (a fraction); a null rule is no limit. The export stage asks and records the verdict; a rejected
    int8 file is not shipped, and the pipeline goes on (like a rejected promotion)."""
    drop, limit = fp32_accuracy - int8_accuracy, policy.max_int8_accuracy_drop
    checks = [
        _at_most(INT8_RULES[0], drop, limit, f" (fp32 {fp32_accuracy:.4f}, int8 {int8_accuracy:.4f})")
        if limit is not None else (True, f"{INT8_RULES[0]} n/a (no limit): pass"),
        _at_most(INT8_RULES[1], int8_size, policy.max_int8_size_bytes, fmt=".0f")
        if policy.max_int8_size_bytes is not None else (True, f"{INT8_RULES[1]} n/a (no limit): pass"),
    ]
    if perplexity is not None:
        rise, most = perplexity[1] / perplexity[0] - 1, policy.max_int8_perplexity_increase
        checks.append(_at_most(INT8_RULES[2], rise, most, f" (fp32 {perplexity[0]:.2f}, int8 {perplexity[1]:.2f})")
                      if most is not None else (True, f"{INT8_RULES[2]} n/a (no limit): pass"))
    return Decision("promoted" if all(ok for ok, _ in checks) else "rejected", tuple(r for _, r in checks))
