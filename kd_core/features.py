"""Intermediate-representation distillation: teacher activations cached once, student hints trained from them.

The teacher side runs in cache_logits: forward hooks capture the `cache.features` modules in the same
pass as the logits, `pool` reduces them, and the cache stores them (kd_core.cache). The student side
runs in train_student: `HintedStudent` wraps the student with hooks on the `distill.features` modules
and one learned projection per hint whose shapes differ; the projections train with the student and
are never saved, so the saved and exported student is the same network as without hints.

Shapes are per row, channels first, as torch's convolutions produce them: (C,) for a vector, (C, *S) for a
map over positions S (a sequence, an image). `pool` reduces S by mean or max; a vector passes unchanged.
A transformer's hidden states are channels last, (B, L, H) with padding: a model that reads padded
sequences exposes the last forward's (B, L) padding mask as `.mask` (kd_core.tasks.text.models.TextClassifier),
and `pool` then reduces L over the real tokens only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kd_core import losses, tasks
from kd_core.config import DistillParams, Params
from kd_core.data import Schema
from kd_core.errors import UserError

Shape = tuple[int, ...]  # one row's feature shape
_CONVS = {2: nn.Conv1d, 3: nn.Conv2d, 4: nn.Conv3d}  # per-row rank of a map -> its 1×1 convolution


def pool(x: torch.Tensor, how: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean or max over the positions of a map; `none`, or a (B, C) vector, passes through.  # (B, C, *S) -> (B, C)

    With a padding `mask` (B, L) of a sequence model, a (B, L, H) map is channels last: the mean or max
    runs over the real tokens of each row only.  # (B, L, H) -> (B, H)
    """
    if mask is not None and x.dim() == 3 and x.shape[:2] == mask.shape:
        if how == "none":
            raise UserError("a hidden-state feature of a sequence model varies in length: use pool: mean or max")
        keep = mask.unsqueeze(-1).to(x.dtype)  # (B, L, 1)
        if how == "mean":
            return (x * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)
        return x.masked_fill(keep == 0, float("-inf")).amax(dim=1)
    if how == "none" or x.dim() <= 2:
        return x
    flat = x.flatten(2)  # (B, C, prod S)
    return flat.mean(dim=-1) if how == "mean" else flat.amax(dim=-1)


def padding_mask(model: nn.Module) -> torch.Tensor | None:
    """The (B, L) padding mask of `model`'s last forward, for a model that reads padded sequences."""
    mask = getattr(model, "mask", None)
    return mask if isinstance(mask, torch.Tensor) else None


def module_names(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def check_modules(model: nn.Module, names: Sequence[str], where: str) -> None:
    """Every name must be one of `model`'s modules; the error lists the valid ones."""
    valid = module_names(model)
    if missing := [n for n in names if n not in valid]:
        raise UserError(f"{where}: no module {missing[0]!r} in the {type(model).__name__}; "
                        f"valid module names: {', '.join(valid)}")


def _keep(store: dict[str, torch.Tensor], name: str, _module: nn.Module, _inputs: tuple, output: object) -> None:
    """Forward hook: keep a copy of `output` (differentiable), since a later in-place op such as
    ReLU(inplace=True) would otherwise change what was captured."""
    if not isinstance(output, torch.Tensor):
        raise UserError(f"module {name!r} returns a {type(output).__name__}, not a tensor; hint another module")
    store[name] = output.clone()


@contextmanager
def captured(model: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """While open, every forward pass of `model` leaves each named module's output in the yielded dict."""
    check_modules(model, names, "features")
    modules = dict(model.named_modules())
    store: dict[str, torch.Tensor] = {}
    handles = [modules[n].register_forward_hook(partial(_keep, store, n)) for n in names]
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def probe(model: nn.Module, captures: Sequence[tuple[str, str]], example: torch.Tensor) -> tuple[Shape, ...]:
    """Per-row shape of each (module, pool) capture, from one forward pass on `example` (two rows, so
    batch statistics and squeezes behave as in training)."""
    mode = model.training
    with captured(model.eval(), [m for m, _ in captures]) as acts:
        model(example)
    model.train(mode)
    return tuple(tuple(pool(acts[m], p, padding_mask(model)).shape[1:]) for m, p in captures)


def projection(student: Shape, teacher: Shape, loss: str, where: str) -> nn.Module | None:
    """The learned map from the student's feature shape to the teacher's; None when none is needed.

    Equal shapes need none; a vector maps by a linear layer onto the teacher's (flattened) feature; a
    map onto a map with the same positions by a 1×1 convolution over channels. Attention transfer
    compares channel-free maps, so it needs no projection, only equal positions. Anything else
    cannot be projected and is refused before any compute.
    """
    if loss == "attention":
        if len(student) < 2 or len(teacher) < 2 or student[1:] != teacher[1:]:
            raise UserError(f"{where}: attention transfer needs maps over the same positions, got student "
                            f"{student} and teacher {teacher} (use pool: none on the teacher feature)")
        return None
    if student == teacher:
        return None
    if len(student) == 1:
        return nn.Sequential(nn.Linear(student[0], int(np.prod(teacher))), nn.Unflatten(1, teacher))
    if len(student) == len(teacher) and student[1:] == teacher[1:] and len(student) in _CONVS:
        return _CONVS[len(student)](student[0], teacher[0], kernel_size=1)
    raise UserError(f"{where}: cannot project the student's {student} feature onto the teacher's {teacher}: "
                    "a 1×1 convolution needs the same positions (pool both sides with pool: mean or max)")


@dataclass(frozen=True)
class Hint:
    """One planned hint: which modules, how compared, and the shapes that decided the projection."""

    teacher: str
    student: str
    loss: str
    weight: float
    pool: str  # the teacher feature's pooling, applied to the student's output too
    student_shape: Shape
    teacher_shape: Shape


def plan(distill: DistillParams, cached: Sequence[dict], student: nn.Module, example: torch.Tensor) -> list[Hint]:
    """Check every `distill.features` entry against the student and the cached teacher features.

    `cached` holds the cache manifest's feature entries (module, pool, shape). Raises a UserError
    naming the valid modules, or the shapes that cannot be projected.
    """
    if not distill.features:
        return []
    check_modules(student, [h.student for h in distill.features], "distill.features")
    teacher = {f["module"]: f for f in cached}
    if missing := [h.teacher for h in distill.features if h.teacher not in teacher]:
        raise UserError(f"distill.features: teacher feature {missing[0]!r} is not in the cache "
                        f"(it holds {list(teacher)}): re-run the cache_logits stage")
    shapes = probe(student, [(h.student, teacher[h.teacher]["pool"]) for h in distill.features], example)
    hints = [Hint(h.teacher, h.student, h.loss, h.weight, teacher[h.teacher]["pool"], s,
                  tuple(teacher[h.teacher]["shape"])) for h, s in zip(distill.features, shapes, strict=True)]
    for h in hints:
        projection(h.student_shape, h.teacher_shape, h.loss, f"distill.features {h.student} -> {h.teacher}")
    return hints


class HintedStudent(nn.Module):
    """What train_student trains: the student plus its hint projections. Only `student` is saved.

    `forward` is the student's own; hooks keep the hinted modules' outputs for `extra_loss`.
    """

    def __init__(self, student: nn.Module, hints: Sequence[Hint], l2: float = 0.0) -> None:
        super().__init__()
        self.student, self.hints, self.l2 = student, tuple(hints), l2
        self.projections = nn.ModuleDict({
            str(j): p for j, h in enumerate(self.hints)
            if (p := projection(h.student_shape, h.teacher_shape, h.loss, h.student)) is not None})
        self._acts: dict[str, torch.Tensor] = {}
        modules = dict(student.named_modules())
        self._handles = [modules[n].register_forward_hook(partial(_keep, self._acts, n))
                         for n in dict.fromkeys(h.student for h in self.hints)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B, K)
        return self.student(x)

    def extra_loss(self, teacher: Sequence[torch.Tensor], rows: int) -> torch.Tensor:
        """Per row: Σ_h w_h·L_h(r_h(pool(s_h)), t_h) from the last forward, + λ‖W‖².  # (B,)

        λ‖W‖² is added to every row, so the batch mean the loop takes adds exactly λ‖W‖² once.
        """
        total = torch.zeros(rows, device=next(self.student.parameters()).device)
        for j, (h, t) in enumerate(zip(self.hints, teacher, strict=True)):
            s = pool(self._acts[h.student], h.pool, padding_mask(self.student))  # (B, *S_student)
            if str(j) in self.projections:
                s = self.projections[str(j)](s)  # (B, *S_teacher)
            total = total + h.weight * losses.HINTS.get(h.loss)(s, t)
        if self.l2:
            total = total + self.l2 * losses.l2_penalty(self.student).to(total.device)
        return total

    def release(self) -> nn.Module:
        """The bare student, its hooks removed: what is saved and exported."""
        for h in self._handles:
            h.remove()
        return self.student


def extra_loss(net: HintedStudent,
               take: Callable[[np.ndarray, str], np.ndarray]) -> Callable[[np.ndarray], torch.Tensor]:
    """kd_core.train's `extra`: row numbers -> per-row hint loss, reading teacher features with `take`
    (LogitCache.take_feature) for the rows of the step."""
    def extra(rows: np.ndarray) -> torch.Tensor:  # (b,) -> (b,)
        device = next(net.parameters()).device
        feats = [torch.from_numpy(take(rows, h.teacher)).to(device) for h in net.hints]  # [(b, *S)]
        return net.extra_loss(feats, len(rows))
    return extra


def check(params: Params, teacher: nn.Module, schema: Schema, init: Path | None = None,
          root: Path | None = None) -> tuple[Shape, ...]:
    """Config-time check of both feature lists against the teacher and the student `params` describe,
    before any compute (an untrained network will do: only names and shapes matter; `init`: the task's
    pretrained weights, which text students are built from; `root`: the project, for a student.arch
    directory). Returns the teacher features' per-row shapes."""
    if not params.cache.features:  # distill.features needs cache.features (kd_core.config)
        return ()
    task = tasks.for_params(params)
    spec = task.spec(params.student, schema, root)
    with torch.random.fork_rng():  # building the student must not move the seeded stream
        student = task.build(spec, None, None, init)
    example = task.example(spec, batch=2)
    captures = [(f.module, f.pool) for f in params.cache.features]
    check_modules(teacher, [m for m, _ in captures], "cache.features")
    shapes = probe(teacher, captures, example)
    cached = [{"module": m, "pool": p, "shape": s} for (m, p), s in zip(captures, shapes, strict=True)]
    plan(params.distill, cached, student, example)
    return shapes
