"""distill.search: which settings are tried, and which one wins on the validation rows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kd_core import search
from kd_core.config import DistillParams, Params, SearchCandidate, SearchParams


def _distill(*candidates: dict) -> DistillParams:
    return DistillParams(alpha=0.9, temperature=2.0,
                         search=SearchParams(candidates=tuple(SearchCandidate(**c) for c in candidates), epochs=3))


def test_the_configured_setting_and_labels_alone_are_always_tried_first() -> None:
    tried = search.candidates(_distill({"alpha": 0.5}, {"temperature": 4.0}, {"alpha": 0.9}, {"alpha": 0.0}))
    labels = [search.label(d.alpha, d.temperature, d.loss) for d in tried]
    assert labels == ["alpha 0.9, T 2, hinton", "alpha 0 (labels only)", "alpha 0.5, T 2, hinton",
                      "alpha 0.9, T 4, hinton"]  # duplicates of the first two dropped
    assert all(d.search is None for d in tried)
    assert search.labels_only(tried[1]) and not search.labels_only(tried[0])


def _trial(acc: float, nll: float, alpha: float = 0.9) -> search.Trial:
    return search.Trial(alpha, 2.0, "hinton", acc, nll, 3, 1.0)


def test_accuracy_wins_for_classifiers_perplexity_for_lm_and_ties_go_to_the_configured_setting() -> None:
    trials = [_trial(0.80, 0.6), _trial(0.82, 0.9, 0.0), _trial(0.82, 0.7, 0.5), _trial(0.79, 0.5, 1.0)]
    assert search.best(trials, "accuracy") == 2  # 0.82 twice: the lower NLL
    assert search.best(trials, "perplexity") == 3  # lowest NLL
    assert search.best([_trial(0.8, 0.6), _trial(0.8, 0.6, 0.5)], "accuracy") == 0


def test_the_record_round_trips_into_the_setting_trained(tmp_path: Path) -> None:
    d = _distill({"alpha": 0.5, "temperature": 4.0, "loss": "dkd"})
    tried = search.candidates(d)
    trials = [_trial(0.7, 1.0), _trial(0.72, 0.9, 0.0), search.Trial(0.5, 4.0, "dkd", 0.8, 0.5, 2, 1.0)]
    search.write(tmp_path / search.SEARCH_FILE, trials, 2, 3)
    record = search.read(tmp_path)
    assert record["chosen"] == "alpha 0.5, T 4, dkd" and len(record["trials"]) == len(tried)
    chosen = search.chosen_setting(d, record)
    assert (chosen.alpha, chosen.temperature, chosen.loss, chosen.search) == (0.5, 4.0, "dkd", None)
    assert search.chosen_setting(d, None).alpha == 0.9
    assert json.loads((tmp_path / search.SEARCH_FILE).read_text())["trials"][1]["label"] == "alpha 0 (labels only)"


def test_a_search_needs_validation_rows_and_known_losses() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        Params(distill=_distill(), train={"val_fraction": 0.0})
    with pytest.raises(ValueError, match="unknown loss 'kl'"):
        _distill({"loss": "kl"})


def test_a_teacher_based_winner_must_beat_labels_alone_significantly() -> None:
    labels = np.array([True] * 30 + [False] * 10)
    clear = np.array([True] * 40)  # right on every row labels alone missed: p = 0.5**10
    slight = np.array([True] * 31 + [False] * 9)  # one more row right: p = 0.5
    right = [slight, labels, clear]
    assert search.guarded(2, 1, right, 0.05) == (2, pytest.approx(0.5 ** 10))
    assert search.guarded(0, 1, right, 0.05) == (1, pytest.approx(0.5))  # noise: labels alone is kept
    assert search.guarded(1, 1, right, 0.05) == (1, None)
    assert search.guarded(0, 1, right, 1.0)[0] == 0  # max_p_value 1 switches the gate off
