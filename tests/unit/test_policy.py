"""The promotion policy as a pure function: every rule both ways, and no silent defaults."""

from __future__ import annotations

import pytest

from kd_core.config import PolicyParams
from kd_core.errors import UserError
from kd_core.registry import RULES, decide_promotion

POLICY = PolicyParams(min_teacher_retention=0.9, min_gain_over_baseline=0.01, min_gain_over_champion=0.0)


def acc(a: float) -> dict:
    return {"accuracy": a, "ece": 0.02, "nll": 0.3}


def decide(student: float, teacher: float = 0.9, baseline: float = 0.8, champion: float | None = None,
           policy: PolicyParams = POLICY):
    return decide_promotion(acc(student), acc(teacher), acc(baseline), champion, policy)


def reason(decision, rule: str) -> str:
    (found,) = [r for r in decision.reasons if r.startswith(rule)]
    return found


def test_all_rules_pass_promotes_and_reports_every_rule():
    d = decide(0.85, champion=0.84)
    assert d.decision == "promoted"
    assert len(d.reasons) == len(RULES)
    assert reason(d, "teacher_retention") == "teacher_retention 0.9444 >= 0.9000: pass"
    assert reason(d, "gain_over_baseline") == "gain_over_baseline 0.0500 >= 0.0100: pass"
    assert reason(d, "gain_over_champion") == "gain_over_champion 0.0100 >= 0.0000: pass"


@pytest.mark.parametrize(("student", "teacher", "expected"), [(0.81, 0.9, "pass"), (0.80, 0.9, "fail")])
def test_teacher_retention(student, teacher, expected):
    d = decide(student, teacher=teacher, baseline=0.5)
    assert reason(d, "teacher_retention").endswith(expected)
    assert d.decision == ("promoted" if expected == "pass" else "rejected")


@pytest.mark.parametrize(("baseline", "expected"), [(0.84, "pass"), (0.845, "fail")])
def test_gain_over_baseline(baseline, expected):
    d = decide(0.85, baseline=baseline)
    assert reason(d, "gain_over_baseline").endswith(expected)
    assert d.decision == ("promoted" if expected == "pass" else "rejected")


@pytest.mark.parametrize(("champion", "expected"), [(0.85, "pass"), (0.851, "fail")])
def test_gain_over_champion(champion, expected):
    d = decide(0.85, champion=champion)
    assert reason(d, "gain_over_champion").endswith(expected)
    assert d.decision == ("promoted" if expected == "pass" else "rejected")


def test_no_champion_passes_that_rule_and_says_so():
    d = decide(0.85, champion=None)
    assert reason(d, "gain_over_champion") == "gain_over_champion n/a (no champion): pass"
    assert d.decision == "promoted"


def test_thresholds_hold_at_equality_despite_float_rounding():
    policy = PolicyParams(min_teacher_retention=0.0, min_gain_over_baseline=0.1, min_gain_over_champion=0.1)
    assert decide(0.3, baseline=0.2, champion=0.2, policy=policy).decision == "promoted"  # 0.3-0.2 < 0.1


def test_useless_teacher_rejects_instead_of_dividing_by_zero():
    d = decide(0.5, teacher=0.0, baseline=0.1)
    assert d.decision == "rejected"
    assert reason(d, "teacher_retention").endswith("fail")


@pytest.mark.parametrize("role", ["candidate", "teacher", "baseline"])
def test_missing_accuracy_raises_never_defaults(role):
    args = {"candidate": acc(0.9), "teacher": acc(0.9), "baseline": acc(0.8)}
    args[role] = {"ece": 0.01}
    with pytest.raises(UserError, match="lack 'accuracy'"):
        decide_promotion(args["candidate"], args["teacher"], args["baseline"], None, POLICY)


@pytest.mark.parametrize("bad", [85.0, -0.1, "0.9", None, True, float("nan")])
def test_accuracy_must_be_a_fraction(bad):
    with pytest.raises(UserError, match="fraction"):
        decide_promotion({"accuracy": bad}, acc(0.9), acc(0.8), None, POLICY)


def test_decision_is_frozen():
    d = decide(0.85)
    with pytest.raises(AttributeError):
        d.decision = "promoted"  # type: ignore[misc]
