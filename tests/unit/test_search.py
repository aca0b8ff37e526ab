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


def _trial(acc: float, nll: float, alpha: float = 0.9, temperature: float = 2.0, loss: str = "hinton") -> search.Trial:
    return search.Trial(alpha, temperature, loss, acc, nll, 1.0, 100, 3, 400, 1, 40)


def test_accuracy_wins_for_classifiers_perplexity_for_lm_and_ties_go_to_the_configured_setting() -> None:
    trials = [_trial(0.80, 0.6), _trial(0.82, 0.9, 0.0), _trial(0.82, 0.7, 0.5), _trial(0.79, 0.5, 1.0)]
    assert search.best(trials, False) == 2  # 0.82 twice: the lower NLL
    assert search.best(trials, True) == 3  # lowest NLL
    assert search.best([_trial(0.8, 0.6), _trial(0.8, 0.6, 0.5)], False) == 0


def test_the_record_round_trips_into_the_setting_trained(tmp_path: Path) -> None:
    d = _distill({"alpha": 0.5, "temperature": 4.0, "loss": "dkd"})
    tried = search.candidates(d)
    trials = [_trial(0.7, 1.0), _trial(0.72, 0.9, 0.0), _trial(0.8, 0.5, 0.5, 4.0, "dkd")]
    decision = search.Decision(2, 0.01, "alpha 0.5, T 4, dkd beat the configured setting significantly")
    search.write(tmp_path / search.SEARCH_FILE, trials, decision, "5-fold over the 40 labelled rows", 3)
    record = search.read(tmp_path)
    assert record["chosen"] == "alpha 0.5, T 4, dkd" and len(record["trials"]) == len(tried)
    assert record["scored_by"].startswith("5-fold") and record["p_value_vs_configured"] == 0.01
    assert {t["steps"] for t in record["trials"]} == {100}  # the budget each got is on record
    chosen = search.chosen_setting(d, record)
    assert (chosen.alpha, chosen.temperature, chosen.loss, chosen.search) == (0.5, 4.0, "dkd", None)
    assert search.chosen_setting(d, None).alpha == 0.9
    assert json.loads((tmp_path / search.SEARCH_FILE).read_text())["trials"][1]["label"] == "alpha 0 (labels only)"


def test_a_search_needs_validation_rows_and_known_losses() -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        Params(distill=_distill(), train={"val_fraction": 0.0})
    with pytest.raises(ValueError, match="unknown loss 'kl'"):
        _distill({"loss": "kl"})


def test_another_setting_replaces_the_configured_one_only_when_it_beats_it_significantly() -> None:
    own = np.array([1.0] * 30 + [0.0] * 10)
    clear = np.ones(40)  # right on every row the configured setting missed: p = 0.5**10
    slight = np.array([1.0] * 31 + [0.0] * 9)  # one more row right: p = 0.5
    trials = [_trial(0.75, 0.6), _trial(0.775, 0.6, 0.0), _trial(1.0, 0.1, 0.5)]
    won = search.decide(trials, [own, slight, clear], False, 0.05)
    assert (won.chosen, won.p_value) == (2, pytest.approx(0.5 ** 10)) and "significantly" in won.reason
    # labels alone scored best, by one row: "we could not tell" keeps the configured setting, and says so
    unsure = search.decide(trials[:2], [own, slight], False, 0.05)
    assert (unsure.chosen, unsure.p_value) == (0, pytest.approx(0.5)) and unsure.reason.startswith("not separable")
    # ... and labels alone that beats it clearly is kept: the baseline's twin
    assert search.decide([_trial(0.75, 0.6), _trial(1.0, 0.1, 0.0)], [own, clear], False, 0.05).chosen == 1
    best_own = search.decide([_trial(0.9, 0.3), _trial(0.8, 0.5, 0.0)], [clear, own], False, 0.05)
    assert (best_own.chosen, best_own.p_value) == (0, None)
    assert search.decide(trials[:2], [own, slight], False, 1.0).chosen == 1  # max_p_value 1: best score wins


def test_lm_candidates_are_compared_sequence_by_sequence_on_their_nll() -> None:
    own_nll = np.full(12, 3.0)
    better = own_nll - 0.1  # every sequence predicted better: p = 0.5**12
    mixed = own_nll + np.array([-0.5] * 7 + [0.2] * 5)  # lower mean NLL, 7 of 12 sequences: not significant
    trials = [_trial(0.3, 3.0), _trial(0.3, 2.9, 0.0), _trial(0.3, 2.85, 0.5)]
    assert search.decide(trials[:2], [-own_nll, -better], True, 0.05).chosen == 1
    assert search.decide([trials[0], trials[2]], [-own_nll, -mixed], True, 0.05).chosen == 0


def test_few_validation_rows_are_replaced_by_k_folds_over_every_labelled_row() -> None:
    cfg = SearchParams(min_val_rows=100, folds=5)
    enough = np.arange(0, 1000, 8)  # 125 rows
    assert [list(f) for f in search.folds(1000, enough, 1, cfg, 0)] == [list(enough)]
    assert len(search.folds(300, np.arange(10), 128, cfg, 0)) == 1  # lm: 10 sequences of 128 tokens are plenty
    few = search.folds(64, np.arange(6), 1, cfg, 0)
    assert len(few) == 5 and sorted(np.concatenate(few).tolist()) == list(range(64))  # each row scored once
    assert search.scored_by(few).startswith("5-fold over the 64 labelled rows")
    assert search.scored_by([enough]) == "the 125 validation rows"
    assert search.scored_by([np.arange(13)], 128) == "the 13 validation rows (1,664 positions)"  # lm sequences
    assert len(search.folds(3, np.arange(0), 1, cfg, 0)) == 3  # tiny sets: never more folds than rows


def test_pooled_scores_count_every_held_out_row_once() -> None:
    acc, nll = search.pooled([(np.array([1.0, 0.0]), np.array([0.5, 1.5])), (np.array([1.0]), np.array([1.0]))])
    assert acc == pytest.approx(2 / 3) and nll == pytest.approx(1.0)
