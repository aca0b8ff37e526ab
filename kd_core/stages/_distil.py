"""What distilling from the cache needs, shared by train_student (its search and its training) and
export (the quantization-aware fine-tune): the rows as cached, the teacher's targets and the loss.

Its own module, so the stages that never read the cache (teacher, baseline) do not depend on it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd_core import data, losses, search, tasks, train
from kd_core.cache import LogitCache, expected_keys
from kd_core.config import DistillParams, Params
from kd_core.stages._common import labelled_arrays, per_row, position_targets, validation_rows


@dataclass(frozen=True)
class KDRows:
    """Labelled rows first, then transfer rows, as cached; labels -1 where there are none."""

    x: np.ndarray  # (N, ...) model inputs
    y: np.ndarray  # (N, ...) class indices (lm: next tokens)
    positions: int  # cache rows per row
    labelled: int  # rows 0 … labelled - 1 carry labels
    val: np.ndarray  # (V,) labelled rows held out from training
    caches: list[LogitCache]  # one per teacher
    keys: list[str]  # their cache keys
    lengths: np.ndarray | None  # (N,) text: sequence lengths, for length-bucketed batches

    def extent(self, distill: DistillParams) -> int:
        """Rows 0 … n - 1 that `distill` trains on: all of them, or the labelled ones (they come first)
        for labels alone (kd_core.search.labels_only)."""
        return self.labelled if search.labels_only(distill) else len(self.x)


def kd_rows(params: Params, workdir: Path, task: tasks.Task, splits: data.Splits) -> KDRows:
    keys = expected_keys(params, workdir)
    caches = [LogitCache(workdir / d, k) for d, k in zip(params.logit_dirs(), keys, strict=True)]
    _, y_lab = labelled_arrays(task, splits)
    x = task.cache_inputs(splits, caches[0].views())  # (N, ...); cache.views: each row's stored views, replayed
    positions = task.positions(x)
    if positions > 1 and y_lab.ndim == 1:  # a row's label holds for each of its positions (its views)
        y_lab = np.repeat(y_lab[:, None], positions, axis=1)  # (N, P)
    y = np.concatenate([y_lab, np.full((len(splits.transfer), *y_lab.shape[1:]), losses.UNLABELLED)])
    val = validation_rows(len(y_lab), params.train.val_fraction, params.train.seed)
    return KDRows(x, y, positions, len(y_lab), val, caches, keys, task.lengths(x, splits.schema))


def kd_objective(distill: DistillParams, rows: KDRows) -> tuple[train.LossFn, train.SoftLabels]:
    """The per-row loss of `distill` and the teacher targets it reads (top-k batches or dense logits)."""
    cache = rows.caches[0]
    loss = per_row(losses.build(distill, cache.top_k), rows.positions)  # a top-k cache: the top-k-aware KL
    one = cache.targets if losses.reads_topk(distill, cache.top_k) else cache.take
    soft = position_targets(one, rows.positions) if len(rows.caches) == 1 else functools.partial(
        losses.ensemble_targets, [c.take for c in rows.caches], distill.ensemble)
    return loss, soft
