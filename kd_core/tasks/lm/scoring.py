"""Evaluation of causal LMs on held-out documents: perplexity, agreement and KL with the teacher,
per-token cost, generation speed — every model in one pass over the same test sequences.

All models score the same batches in turn, so the teacher's distribution for a batch is at hand when
each other model is scored (KL needs both), and memory stays one batch × seq_len × C per model.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kd_core.evaluate import count_macs, count_params

if TYPE_CHECKING:
    from kd_core.tasks.lm.models import CausalLM

BATCH = 4  # test sequences per forward pass
GENERATE_TOKENS = 32  # new tokens per timed greedy generation
PROMPT_TOKENS = 16
# the contract metrics of `metrics/eval.json` per model, in their order there
METRICS = ("perplexity", "nll", "accuracy", "agreement_with_teacher", "kl_to_teacher", "params", "macs",
           "latency_ms_p50", "tokens_per_s", "size_bytes")


@torch.inference_mode()
def sequence_scores(models: dict[str, nn.Module], x: np.ndarray, y: np.ndarray,
                    teacher: str = "teacher") -> dict[str, dict[str, np.ndarray]]:
    """Per model and test sequence: summed NLL of the targets, top-1 agreements with the teacher and
    summed KL(p_teacher ‖ p_model) (nats).  # x, y (N, L) -> {model: {name: (N,)}}"""
    out = {m: {k: np.zeros(len(x)) for k in ("nll", "agree", "kl", "correct")} for m in models}
    for s in range(0, len(x), BATCH):
        xb, yb = torch.from_numpy(x[s:s + BATCH]), torch.from_numpy(y[s:s + BATCH])  # (b, L)
        log_t = F.log_softmax(models[teacher](xb).float(), dim=-1)  # (b, L, C)
        top_t = log_t.argmax(dim=-1)  # (b, L)
        for name, model in models.items():
            log_p = log_t if name == teacher else F.log_softmax(model(xb).float(), dim=-1)
            r = out[name]
            r["nll"][s:s + BATCH] = -log_p.gather(-1, yb[..., None])[..., 0].sum(dim=-1).numpy()
            r["correct"][s:s + BATCH] = (log_p.argmax(dim=-1) == yb).sum(dim=-1).numpy()
            r["agree"][s:s + BATCH] = (log_p.argmax(dim=-1) == top_t).sum(dim=-1).numpy()
            kl = (log_t.exp() * (log_t - log_p)).sum(dim=-1)  # (b, L)
            r["kl"][s:s + BATCH] = kl.sum(dim=-1).numpy()
    return out


@torch.inference_mode()
def nll_per_sequence(model: nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL of the targets and correct top-1 next tokens, per sequence.  # x, y (N, L) -> (N,), (N,)"""
    nll, correct = np.zeros(len(x)), np.zeros(len(x))
    for s in range(0, len(x), BATCH):
        xb, yb = torch.from_numpy(x[s:s + BATCH]), torch.from_numpy(y[s:s + BATCH])
        log_p = F.log_softmax(model.eval()(xb).float(), dim=-1)  # (b, L, C)
        nll[s:s + BATCH] = -log_p.gather(-1, yb[..., None])[..., 0].sum(dim=-1).numpy()
        correct[s:s + BATCH] = (log_p.argmax(dim=-1) == yb).sum(dim=-1).numpy()
    return nll, correct


def perplexity(nll_sum: float, tokens: int) -> float:
    return math.exp(nll_sum / max(tokens, 1))


def tokens_per_second(models: dict[str, nn.Module], prompt: list[int], eos_id: int) -> dict[str, float]:
    """Greedy generation speed at batch 1 (KV cache), the models taking turns three times; the best
    round counts, as the least disturbed by the machine."""
    from kd_core.tasks.lm.models import generate

    best = {m: 0.0 for m in models}
    for _ in range(3):
        for name, model in models.items():
            t0 = time.perf_counter()
            new = generate(cast("CausalLM", model), prompt, GENERATE_TOKENS, eos_id=None)  # no early stop: equal work
            best[name] = max(best[name], len(new) / (time.perf_counter() - t0))
    return best


def lm_metrics(models: dict[str, nn.Module], examples: dict[str, torch.Tensor], x: np.ndarray, y: np.ndarray,
               weights: dict[str, Path], latency_ms: dict[str, float], eos_id: int) -> dict[str, dict]:
    """Every contract metric of `metrics/eval.json` for `lm`, per model (one must be `teacher`)."""
    scores = sequence_scores(models, x, y)
    speed = tokens_per_second(models, x[0, :PROMPT_TOKENS].tolist(), eos_id)
    tokens = y.size
    result = {}
    for name, model in models.items():
        r = scores[name]
        m = token_metrics(model, examples[name], float(r["nll"].sum()), float(r["correct"].sum()),
                          float(r["agree"].sum()), tokens, weights[name], latency_ms[name])
        m |= {"kl_to_teacher": float(r["kl"].sum() / tokens), "tokens_per_s": speed[name]}
        result[name] = {k: m[k] for k in METRICS}
    return result


def token_metrics(model: nn.Module, example: torch.Tensor, nll_sum: float, correct: float, agree: float,
                  tokens: int, weights_file: Path, latency_ms: float) -> dict:
    """The contract metrics of one model that its next-token scores determine (all but `kl_to_teacher`,
    which needs the teacher's distribution, and `tokens_per_s`, which times generation)."""
    return {
        "perplexity": perplexity(nll_sum, tokens),
        "nll": float(nll_sum / tokens),
        "accuracy": float(correct / tokens),  # next-token top-1 on the held-out documents
        "agreement_with_teacher": float(agree / tokens),
        "params": count_params(model),
        "macs": count_macs(model, example),  # one token's forward
        "latency_ms_p50": latency_ms,  # one next-token step (a one-token forward)
        "size_bytes": weights_file.stat().st_size,
    }

