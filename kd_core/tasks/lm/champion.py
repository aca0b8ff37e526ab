"""The lm candidate against the champion: per-sequence NLL on the same held-out sequences (paired)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, cast

from kd_core import tasks
from kd_core.policy import PERPLEXITY, ChampionScore, paired_nll
from kd_core.tasks.lm import models as lm_models
from kd_core.tasks.lm import scoring

if TYPE_CHECKING:
    from kd_core.registry import ChampionInputs


def champion_score(inputs: ChampionInputs) -> ChampionScore | None:
    """The candidate's per-sequence NLL on the held-out sequences, checked against eval.json's perplexity,
    paired with the champion's on the same sequences (its model directory, downloaded)."""
    ev, task = inputs.evidence, tasks.for_params(inputs.params)
    x, y = task.inputs(ev.test, ev.schema), task.labels(ev.test, ev.schema)  # (N, L) each
    mine, _ = scoring.nll_per_sequence(tasks.load_model(inputs.candidate_dir)[0], x, y)
    said, scored = ev.evals["student"].get(PERPLEXITY), scoring.perplexity(mine.sum(), y.size)
    if not isinstance(said, int | float) or abs(said - scored) > 1e-3 * scored:
        raise inputs.stale(PERPLEXITY, said, scored)
    if inputs.champion is None:
        return None
    theirs = cast(lm_models.CausalLM, tasks.load_model(inputs.champion_dir())[0])
    # today's ids mean nothing to a model of another tokenizer (a grown vocabulary would even index past its
    # embeddings): it is not scored, and the decision says why (the candidate cannot show it is better)
    own, today = lm_models.tokenizer_sha256(theirs.tokenizer_json), ev.schema.text_info["tokenizer_sha256"]
    if own != today:
        return ChampionScore(inputs.champion, math.nan, {}, 0, 0, None,
                             f"its tokenizer ({own[:12]}) is not the prepared data's ({today[:12]})")
    nll, correct = scoring.nll_per_sequence(theirs, x, y)
    return paired_nll(inputs.champion, mine, nll, y.size, float(correct.sum() / y.size))
