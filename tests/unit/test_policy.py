"""The promotion policy as a pure function: every rule both ways, and no silent defaults."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from kd_core.config import PolicyParams, parse_params
from kd_core.errors import UserError
from kd_core.policy import RULES, ChampionScore, decide_promotion, mcnemar_p_value, paired_score

POLICY = PolicyParams(min_teacher_retention=0.9, min_gain_over_baseline=0.01, max_latency_ratio=0.5,
                      max_size_bytes=1000, max_class_drop=0.05, min_gain_over_champion=0.0, max_p_value=0.05)


def metrics(a: float, latency: float = 0.1, size: int = 500, per_class: dict | None = None) -> dict:
    return {"accuracy": a, "ece": 0.02, "nll": 0.3, "latency_ms_p50": latency, "size_bytes": size,
            "per_class_accuracy": per_class if per_class is not None else {"a": a, "b": a}}


def champ(accuracy: float = 0.8, per_class: dict | None = None, wins: int = 20, losses: int = 5) -> ChampionScore:
    return ChampionScore(1, accuracy, per_class or {"a": accuracy, "b": accuracy}, wins, losses)


def decide(student: float = 0.85, teacher: float = 0.9, baseline: float = 0.8, champion: ChampionScore | None = None,
           policy: PolicyParams = POLICY, **student_kw):
    return decide_promotion(metrics(student, **student_kw), metrics(teacher, latency=1.0, size=4000),
                            metrics(baseline), champion, policy)


def reason(decision, rule: str) -> str:
    (found,) = [r for r in decision.reasons if r.startswith(rule + " ")]
    return found


def test_all_rules_pass_promotes_and_reports_every_rule_in_order():
    d = decide(0.85, champion=champ(0.84, {"a": 0.86, "b": 0.82}, wins=20, losses=5))
    assert d.decision == "promoted"
    assert [r.split()[0] for r in d.reasons] == list(RULES)
    assert reason(d, "teacher_retention") == "teacher_retention 0.9444 >= 0.9000: pass"
    assert reason(d, "gain_over_baseline") == "gain_over_baseline 0.0500 >= 0.0100: pass"
    assert reason(d, "latency_ratio") == "latency_ratio 0.1000 <= 0.5000: pass"
    assert reason(d, "size_bytes") == "size_bytes 500 <= 1000: pass"
    assert reason(d, "class_drop") == "class_drop 0.0100 (class a vs version 1) <= 0.0500: pass"
    assert reason(d, "gain_over_champion") == "gain_over_champion 0.0100 vs version 1 >= 0.0000: pass"
    assert reason(d, "champion_p_value") == ("champion_p_value 0.0020 (20 wins, 5 losses vs version 1) "
                                             "<= 0.0500: pass")


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


@pytest.mark.parametrize(("latency", "expected"), [(0.5, "pass"), (0.51, "fail")])
def test_latency_ratio_against_the_teacher_in_the_same_process(latency, expected):
    d = decide(latency=latency)  # the teacher took 1.0 ms
    assert reason(d, "latency_ratio").endswith(expected)
    assert d.decision == ("promoted" if expected == "pass" else "rejected")


@pytest.mark.parametrize(("size", "expected"), [(1000, "pass"), (1001, "fail")])
def test_max_size(size, expected):
    d = decide(size=size)
    assert reason(d, "size_bytes") == f"size_bytes {size} <= 1000: {expected}"
    assert d.decision == ("promoted" if expected == "pass" else "rejected")


def test_no_size_limit_says_so():
    d = decide(size=10**9, policy=POLICY.model_copy(update={"max_size_bytes": None}))
    assert reason(d, "size_bytes") == "size_bytes n/a (no limit): pass"
    assert d.decision == "promoted"


@pytest.mark.parametrize(("champion_b", "expected"), [(0.90, "pass"), (0.91, "fail")])
def test_no_class_may_drop_more_than_the_margin(champion_b, expected):
    """The student beats the champion overall, yet losing class b by more than 0.05 rejects it."""
    d = decide(0.85, per_class={"a": 0.85, "b": 0.85}, champion=champ(0.70, {"a": 0.5, "b": champion_b}))
    assert reason(d, "class_drop").startswith(f"class_drop {champion_b - 0.85:.4f} (class b vs version 1)")
    assert reason(d, "class_drop").endswith(expected)
    assert d.decision == ("promoted" if expected == "pass" else "rejected")


@pytest.mark.parametrize(("champion", "expected"), [(0.85, "pass"), (0.851, "fail")])
def test_gain_over_champion(champion, expected):
    d = decide(0.85, champion=champ(champion, {"a": 0.8, "b": 0.8}))
    assert reason(d, "gain_over_champion").endswith(expected)


def test_a_win_that_is_not_significant_is_rejected():
    """Higher accuracy by 3 rows out of 1000 is noise: 5 wins vs 2 losses, p = 0.23."""
    d = decide(0.853, champion=champ(0.85, wins=5, losses=2))
    assert reason(d, "gain_over_champion").endswith("pass")
    assert reason(d, "champion_p_value") == ("champion_p_value 0.2266 (5 wins, 2 losses vs version 1) "
                                             "<= 0.0500: fail")
    assert d.decision == "rejected"


def test_identical_predictions_never_replace_the_champion():
    d = decide(0.85, champion=champ(0.85, wins=0, losses=0))
    assert reason(d, "champion_p_value").startswith("champion_p_value 1.0000")
    assert d.decision == "rejected"


def test_max_p_value_one_disables_the_significance_test():
    d = decide(0.85, champion=champ(0.85, wins=0, losses=0), policy=POLICY.model_copy(update={"max_p_value": 1.0}))
    assert d.decision == "promoted"


def test_no_champion_passes_the_champion_rules_and_says_so():
    d = decide(0.85, champion=None)
    for rule in ("class_drop", "gain_over_champion", "champion_p_value"):
        assert reason(d, rule) == f"{rule} n/a (no champion): pass"
    assert d.decision == "promoted"


def test_thresholds_hold_at_equality_despite_float_rounding():
    policy = POLICY.model_copy(update={"min_teacher_retention": 0.0, "min_gain_over_baseline": 0.1,
                                       "min_gain_over_champion": 0.1, "max_p_value": 1.0})
    assert decide(0.3, baseline=0.2, champion=champ(0.2, {"a": 0.3, "b": 0.3}),
                  per_class={"a": 0.3, "b": 0.3}, policy=policy).decision == "promoted"  # 0.3-0.2 < 0.1


def test_useless_teacher_rejects_instead_of_dividing_by_zero():
    d = decide(0.5, teacher=0.0, baseline=0.1)
    assert d.decision == "rejected"
    assert reason(d, "teacher_retention").endswith("fail")


def test_zero_teacher_latency_rejects_instead_of_dividing_by_zero():
    d = decide_promotion(metrics(0.85), metrics(0.9, latency=0.0), metrics(0.8), None, POLICY)
    assert reason(d, "latency_ratio") == "latency_ratio undefined (teacher latency_ms_p50 0): fail"


@pytest.mark.parametrize("role", ["candidate", "teacher", "baseline"])
def test_missing_accuracy_raises_never_defaults(role):
    args = {"candidate": metrics(0.9), "teacher": metrics(0.9), "baseline": metrics(0.8)}
    del args[role]["accuracy"]
    with pytest.raises(UserError, match="lack 'accuracy'"):
        decide_promotion(args["candidate"], args["teacher"], args["baseline"], None, POLICY)


@pytest.mark.parametrize(("role", "key"), [("candidate", "latency_ms_p50"), ("teacher", "latency_ms_p50"),
                                           ("candidate", "size_bytes")])
def test_missing_latency_or_size_raises(role, key):
    args = {"candidate": metrics(0.9), "teacher": metrics(0.9)}
    del args[role][key]
    with pytest.raises(UserError, match=f"lack '{key}'"):
        decide_promotion(args["candidate"], args["teacher"], metrics(0.8), None, POLICY)


def test_per_class_accuracy_is_required_when_a_champion_exists():
    m = metrics(0.9)
    del m["per_class_accuracy"]
    assert decide_promotion(m, metrics(0.9, latency=1.0), metrics(0.8), None, POLICY).decision == "promoted"
    with pytest.raises(UserError, match="lack 'per_class_accuracy'"):
        decide_promotion(m, metrics(0.9, latency=1.0), metrics(0.8), champ(), POLICY)
    with pytest.raises(UserError, match=r"lacks class\(es\) \['c'\]"):
        decide_promotion(metrics(0.9), metrics(0.9, latency=1.0), metrics(0.8),
                         champ(per_class={"a": 0.8, "b": 0.8, "c": 0.8}), POLICY)


@pytest.mark.parametrize("bad", [85.0, -0.1, "0.9", None, True, float("nan")])
def test_accuracy_must_be_a_fraction(bad):
    with pytest.raises(UserError, match="fraction"):
        decide_promotion({**metrics(0.9), "accuracy": bad}, metrics(0.9), metrics(0.8), None, POLICY)


def test_decision_is_frozen():
    d = decide(0.85)
    with pytest.raises(AttributeError):
        d.decision = "promoted"  # type: ignore[misc]


def test_paired_score_counts_discordant_rows_and_per_class_accuracy():
    labels = np.array(["a", "a", "b", "b", "b"], dtype=object)
    candidate = np.array(["a", "a", "b", "a", "b"], dtype=object)  # wrong on row 3
    champion = np.array(["b", "a", "b", "b", "a"], dtype=object)   # wrong on rows 0 and 4
    s = paired_score(7, candidate, champion, labels)
    assert (s.version, s.accuracy, s.wins, s.losses) == (7, 0.6, 2, 1)
    assert s.per_class_accuracy == {"a": 0.5, "b": 2 / 3}


def test_paired_score_keys_integer_classes_like_eval_json():
    s = paired_score(1, np.array([3, 5]), np.array([3, 3]), np.array([3, 5]))
    assert s.per_class_accuracy == {"3": 1.0, "5": 0.0}


@pytest.mark.parametrize(("wins", "losses"), [(0, 0), (1, 0), (5, 2), (20, 5), (3, 9), (60, 40), (700, 650)])
def test_mcnemar_matches_scipys_exact_binomial_test(wins, losses):
    stats = pytest.importorskip("scipy.stats")
    expected = 1.0 if wins + losses == 0 else stats.binomtest(wins, wins + losses, 0.5, alternative="greater").pvalue
    assert mcnemar_p_value(wins, losses) == pytest.approx(expected, rel=1e-9, abs=1e-15)


def test_policy_params_are_validated():
    with pytest.raises(UserError, match="policy.max_p_value"):
        parse_params({"policy": {"max_p_value": 0}})
    with pytest.raises(UserError, match="policy.max_class_drop"):
        parse_params({"policy": {"max_class_drop": 1.5}})
    with pytest.raises(UserError, match="policy.max_latency_ratio"):
        parse_params({"policy": {"max_latency_ratio": -1}})
    with pytest.raises(UserError, match="policy.max_size_byte: unknown key"):
        parse_params({"policy": {"max_size_byte": 10}})
    assert parse_params({"policy": {"max_size_bytes": None}}).policy.max_size_bytes is None


def test_schedule_params_are_validated():
    assert parse_params({"schedule": {"cron": "*/15 2-4 * * mon-fri"}}).schedule.cron == "*/15 2-4 * * mon-fri"
    assert parse_params({"schedule": {"cron": "@daily"}}).schedule.cron == "@daily"
    for bad, key in [({"cron": "every monday"}, "schedule.cron"), ({"cron": "0 3 * *"}, "schedule.cron"),
                     ({"timezone": "Mars/Olympus"}, "schedule.timezone"),
                     ({"alert_webhook": "ftp://x"}, "schedule.alert_webhook")]:
        with pytest.raises(UserError, match=key):
            parse_params({"schedule": bad})


def test_the_policy_imports_no_mlflow():
    """Pure rules, unit-tested without a tracking store (ARCHITECTURE: policy.py)."""
    code = "import sys, kd_core.policy; print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
