"""`distill.search`: the distillation setting chosen on held-out labelled rows, fairly.

Hinton's α and T are data-dependent: on some data the teacher's soft labels help less than the labels
do. Every candidate trains from the same cache (the teacher never runs again) with the **same budget**:
as many optimizer steps from the same initialisation (labels alone, `alpha: 0`, take them over the
labelled rows with the baseline's recipe), scored once at the end of its budget on the same held-out
labelled rows — no candidate gets more chances to be picked at a lucky epoch than another.
When the validation rows are too few to tell settings apart (`search.min_val_rows`), every candidate
is scored by k-fold over the labelled rows instead (`search.folds` trainings each, every labelled
row scored once, out of fold).

The decision: the `distill` section's own setting is the default. Another candidate (labels alone
included) replaces it only when it scores better *and* beats it significantly on the same rows — a
one-sided exact McNemar test on per-row correctness for classifiers, a sign test on per-sequence
NLL for `lm` (`search.max_p_value`). "We could not tell" keeps the configured setting and says so.
Pure functions; no training here.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kd_core.config import DistillParams, SearchParams
from kd_core.policy import mcnemar_p_value

SEARCH_FILE = "search.json"  # in the student's directory: what was tried and what was kept


@dataclass(frozen=True)
class Trial:
    """One candidate's training budget and its score on the held-out rows (pooled over folds)."""

    alpha: float
    temperature: float
    loss: str
    val_accuracy: float
    val_nll: float
    seconds: float
    steps: int  # optimizer steps per training (the same for every candidate, up to rounding of epochs)
    epochs: int  # passes over its rows per training
    rows: int  # rows it trained on per epoch (labels alone: the labelled ones)
    folds: int  # trainings it was scored by (1: the validation rows)
    scored_rows: int  # held-out labelled rows scored, every one once

    @property
    def label(self) -> str:
        return label(self.alpha, self.temperature, self.loss)


@dataclass(frozen=True)
class Decision:
    chosen: int  # index into the trials
    p_value: float | None  # of the best-scoring candidate against the configured setting; None: it is that
    reason: str  # one line: why this setting trains


def label(alpha: float, temperature: float, loss: str) -> str:
    """'alpha 0.9, T 2, hinton'; labels alone read 'alpha 0 (labels only)'."""
    if alpha == 0:
        return "alpha 0 (labels only)"
    return f"alpha {alpha:g}, T {temperature:g}, {loss}"


def labels_only(d: DistillParams) -> bool:
    """A setting that ignores the teacher: it trains on the labelled rows alone."""
    return d.alpha == 0


def candidates(distill: DistillParams) -> list[DistillParams]:
    """The settings to try, in order: the section's own, labels alone, then `search.candidates`
    (keys they leave out keep the section's values); duplicates dropped."""
    base = distill.model_copy(update={"search": None})
    tried = [base, base.model_copy(update={"alpha": 0.0, "loss": "hinton"})]
    for c in distill.search.candidates if distill.search else ():
        tried.append(base.model_copy(update={k: v for k, v in c.model_dump().items() if v is not None}))
    seen: dict[str, DistillParams] = {}
    for d in tried:
        seen.setdefault(label(d.alpha, d.temperature, d.loss), d)
    return list(seen.values())


def folds(labelled: int, val: np.ndarray, positions: int, cfg: SearchParams, seed: int) -> list[np.ndarray]:
    """The held-out row sets candidates are scored on: the validation rows when they hold at least
    `cfg.min_val_rows` positions, else k folds of all labelled rows (each scored once).  # [(V_f,)]"""
    if len(val) * positions >= cfg.min_val_rows or labelled < 2:
        return [np.sort(val)]
    order = np.random.default_rng(seed).permutation(labelled)
    return [np.sort(f) for f in np.array_split(order, min(cfg.folds, labelled))]


def scored_by(held_out: list[np.ndarray], positions: int = 1) -> str:
    rows = sum(len(f) for f in held_out)
    tokens = f" ({rows * positions:,} positions)" if positions > 1 else ""
    if len(held_out) == 1:
        return f"the {rows} validation rows{tokens}"
    return f"{len(held_out)}-fold over the {rows} labelled rows{tokens} (too few validation rows)"


def best(trials: list[Trial], nll_first: bool) -> int:
    """Index of the best score: highest accuracy, then lowest NLL (`nll_first`, for a task whose headline
    is lower-is-better such as perplexity: lowest NLL first); the earliest of equals, so the configured
    setting wins ties."""
    def key(i: int) -> tuple[float, float]:
        t = trials[i]
        return (-t.val_nll, t.val_accuracy) if nll_first else (t.val_accuracy, -t.val_nll)
    return max(range(len(trials)), key=lambda i: (key(i), -i))


def decide(trials: list[Trial], per_row: list[np.ndarray], nll_first: bool, max_p: float) -> Decision:
    """The configured setting (trial 0) unless the best-scoring candidate beats it significantly on
    the same rows. `per_row[i]`: trial i's per-row score, higher is better (classifiers: 1 right,
    0 wrong; `lm`: minus the sequence's NLL).  # [(V,)]"""
    top = best(trials, nll_first)
    if top == 0:
        return Decision(0, None, "the configured setting scored best")
    won, own = per_row[top], per_row[0]
    p = mcnemar_p_value(int((won > own).sum()), int((won < own).sum()))
    name = trials[top].label
    if p <= max_p:
        return Decision(top, p, f"{name} beat the configured setting significantly (p = {p:.2g})")
    return Decision(0, p, f"not separable: {name} scored higher but not significantly (p = {p:.2g} > "
                          f"{max_p:g}); the configured setting is kept")


def write(path: Path, trials: list[Trial], decision: Decision, how: str, epochs: int) -> None:
    record = {"chosen": trials[decision.chosen].label, "chosen_index": decision.chosen, "epochs": epochs,
              "scored_by": how, "decision": decision.reason, "p_value_vs_configured": decision.p_value,
              "trials": [asdict(t) | {"label": t.label} for t in trials]}
    path.write_text(json.dumps(record, indent=2) + "\n")


def read(model_dir: Path) -> dict | None:
    """The search record of a student directory; None when its setting was not searched."""
    path = model_dir / SEARCH_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def chosen_setting(distill: DistillParams, record: dict | None) -> DistillParams:
    """The setting a student was trained with: the section's own, or the search's winner."""
    if record is None:
        return distill.model_copy(update={"search": None})
    t = record["trials"][record["chosen_index"]]
    return distill.model_copy(update={"search": None, "alpha": t["alpha"], "temperature": t["temperature"],
                                      "loss": t["loss"]})


def pooled(scores: list[tuple[np.ndarray, np.ndarray]]) -> tuple[float, float]:
    """Mean accuracy and NLL over the held-out rows of every fold, each row counted once: [(V_f,) x 2]."""
    acc = np.concatenate([a for a, _ in scores])
    nll = np.concatenate([n for _, n in scores])
    return (float(acc.mean()), float(nll.mean())) if len(acc) else (math.nan, math.inf)
