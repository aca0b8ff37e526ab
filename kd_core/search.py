"""`distill.search`: the distillation setting chosen on the held-out validation rows.

Hinton's α and T are data-dependent: on some tables the teacher's soft labels help less than the
labels do. Every candidate trains briefly from the same cache (the teacher never runs again), each
is scored on the labelled rows held out by `train.val_fraction`, and the best one trains fully. The
`distill` section's own setting is always the first candidate (it wins ties) and labels alone
(`alpha: 0`, trained on the labelled rows with the hard-label baseline's recipe) is always one. A few
hundred validation rows (or a dozen, on a small table) rank settings noisily, so for classifiers a
teacher-based winner must beat labels alone *significantly* on the same rows (one-sided exact
McNemar test, `search.max_p_value`); otherwise labels alone is kept and the student is the baseline's
twin: never worse than it. Pure functions; no training here.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kd_core.config import DistillParams
from kd_core.policy import mcnemar_p_value

SEARCH_FILE = "search.json"  # in the student's directory: what was tried and what was kept


@dataclass(frozen=True)
class Trial:
    """One candidate's short training, scored at its best epoch on the validation rows."""

    alpha: float
    temperature: float
    loss: str
    val_accuracy: float
    val_nll: float
    best_epoch: int
    seconds: float

    @property
    def label(self) -> str:
        return label(self.alpha, self.temperature, self.loss)


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


def trial(d: DistillParams, history: list[dict[str, float]], best_epoch: int) -> Trial:
    """Score a candidate's curve at its best epoch (the one fit kept: kd_core.train.best_epoch). No import
    of the training code here: register and report read search records without depending on it."""
    row = history[best_epoch - 1]
    return Trial(d.alpha, d.temperature, d.loss, row["val_accuracy"], row.get("val_nll", math.inf),
                 int(row["epoch"]), sum(h["seconds"] for h in history))


def best(trials: list[Trial], headline: str) -> int:
    """Index of the winner: highest validation accuracy, then lowest NLL (for `lm`, whose headline is
    perplexity: lowest NLL first); the earliest of equals, so the configured setting wins ties."""
    def key(i: int) -> tuple[float, float]:
        t = trials[i]
        return (-t.val_nll, t.val_accuracy) if headline == "perplexity" else (t.val_accuracy, -t.val_nll)
    return max(range(len(trials)), key=lambda i: (key(i), -i))


def guarded(best_index: int, labels_index: int, right: list[np.ndarray], max_p: float) -> tuple[int, float | None]:
    """The winner, unless it uses the teacher and does not beat labels alone significantly on the same
    validation rows; `right[i]` is trial i's per-row correctness (V,). Returns the index kept and the
    p-value of the winner against labels alone (None when the winner is labels alone)."""
    if best_index == labels_index:
        return best_index, None
    won, lost = right[best_index], right[labels_index]
    p = mcnemar_p_value(int((won & ~lost).sum()), int((~won & lost).sum()))
    return (best_index if p <= max_p else labels_index), p


def write(path: Path, trials: list[Trial], chosen: int, epochs: int, p_value: float | None = None) -> None:
    record = {"chosen": trials[chosen].label, "chosen_index": chosen, "epochs": epochs,
              "p_value_vs_labels_only": p_value, "trials": [asdict(t) | {"label": t.label} for t in trials]}
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
