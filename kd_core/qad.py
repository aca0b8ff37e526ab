"""Quantization-aware distillation: the student fine-tuned through simulated int8, against the cached teacher.

Post-training quantization rounds weights and activations the network never saw rounded; a short
fine-tune with the rounding in the forward pass lets the weights settle where int8 loses least (Jacob
et al. 2018; NVIDIA ModelOpt's QAD does this for large models). Every layer the int8 export quantizes
— `nn.Linear`, `nn.Conv1d/2d/3d` (the cnn1d architecture) and transformers' `Conv1D` (GPT-2: a linear
with its weight transposed) — computes `op(fq(x), fq(W), b)`: weights per output channel, symmetric
int8 in [-127, 127] like ONNX Runtime's per-channel weights; inputs per tensor, asymmetric uint8 with
ranges tracked as a moving average of each batch's min and max (frozen in eval mode) like its
calibrated activations. A student computing with any other weight (a transposed convolution, a raw
matrix) is refused rather than fine-tuned without rounding under the name of QAD. Gradients
pass straight through the rounding (PyTorch's fake-quantize ops). The simulation lives on the modules
only while training: `release` restores plain modules, whose weights are the fine-tuned float ones
the static int8 export then quantizes. Tied weights stay tied (the module's own Parameter is rounded).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterator
from typing import cast

import torch
from torch import nn

from kd_core.errors import UserError

RANGE = "qad_input_range"  # buffer on each simulated layer: [min, max] of its input; in checkpoints
MOMENTUM = 0.01  # moving average of the input range, as torch.ao's MovingAverageMinMaxObserver
W_MAX = 127  # symmetric int8 weights
A_LEVELS = 255  # uint8 activations


def fake_weight(w: torch.Tensor, axis: int = 0) -> torch.Tensor:
    """w rounded to int8 per output channel (along `axis`), symmetric.  # (out, in, ...) -> same shape"""
    rest = [d for d in range(w.dim()) if d != axis]
    scale = (w.detach().abs().amax(dim=rest).clamp_min(1e-8) / W_MAX).float()  # (out,)
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w.float(), scale, zero, axis, -W_MAX, W_MAX).to(w.dtype)


def fake_input(x: torch.Tensor, rng: torch.Tensor) -> torch.Tensor:
    """x rounded to uint8 over [min(rng[0], 0), max(rng[1], 0)] (zero exactly representable).  # (..., in)"""
    lo, hi = rng[0].clamp(max=0.0), rng[1].clamp(min=0.0)
    scale = ((hi - lo) / A_LEVELS).clamp_min(1e-8).float()
    zero = torch.round(-lo / scale).clamp(0, A_LEVELS).to(torch.int32)
    return torch.fake_quantize_per_tensor_affine(x.float(), scale, zero, 0, A_LEVELS).to(x.dtype)


def _observe(module: nn.Module, x: torch.Tensor) -> None:
    """Training mode: move the input range toward this batch's (the first batch sets it)."""
    with torch.no_grad():
        now = torch.stack([x.detach().min(), x.detach().max()]).float()
        rng = getattr(module, RANGE)
        if torch.isnan(rng).any():
            rng.copy_(now)
        else:
            rng.lerp_(now, MOMENTUM)


Op = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]  # (x, weight, bias) -> y


def _kind(module: nn.Module) -> tuple[int, Op] | None:
    """How `module` computes with its weight: (output-channel axis of the weight, op), or None."""
    if isinstance(module, nn.Linear):
        return 0, nn.functional.linear
    if isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        return 0, module._conv_forward  # padding modes included
    hf = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)  # loaded if a model has one
    if hf is not None and isinstance(module, hf):  # y = x @ W + b, W: (in, out)
        return 1, lambda x, w, b: nn.functional.linear(x, w.t(), b)
    return None


def _simulated_forward(module: nn.Module, axis: int, op: Op):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if module.training:
            _observe(module, x)
        weight, bias = cast(torch.Tensor, module.weight), cast("torch.Tensor | None", module.bias)
        return op(fake_input(x, getattr(module, RANGE)), fake_weight(weight, axis), bias)
    return forward


def layers(model: nn.Module) -> Iterator[tuple[nn.Module, int, Op]]:
    """Every layer int8 is simulated on, with its weight's output-channel axis and op."""
    return ((m, *k) for m in model.modules() if (k := _kind(m)) is not None)


def _unsimulated(model: nn.Module) -> Counter[str]:
    """Types of the modules that multiply by a weight matrix or kernel QAD would not round: any other
    module owning a parameter of 2+ dimensions (embedding tables are looked up, not multiplied)."""
    return Counter(type(m).__name__ for m in model.modules()
                   if _kind(m) is None and not isinstance(m, nn.Embedding)
                   and any(p.dim() >= 2 for p in m.parameters(recurse=False)))


def simulate(model: nn.Module) -> int:
    """Put int8 simulation on every layer of `model`, in place; returns how many. The input ranges
    start unknown (NaN) and are buffers, so a checkpoint of the model carries them. A model with a
    weight this cannot simulate, or with nothing to simulate, is refused before anything changes."""
    left = _unsimulated(model)
    if left:
        named = ", ".join(f"{name} ×{n}" for name, n in sorted(left.items()))
        raise UserError(f"export.int8: qad simulates int8 only in Linear, Conv1d/2d/3d and transformers' Conv1D "
                        f"layers; this student also computes with {named}: use export.int8: static or dynamic")
    n = 0
    for m, axis, op in layers(model):
        m.register_buffer(RANGE, torch.full((2,), float("nan"), device=cast(torch.Tensor, m.weight).device))
        m.forward = _simulated_forward(m, axis, op)
        n += 1
    if n == 0:
        raise UserError("export.int8: qad found no Linear or Conv layer to simulate int8 in: "
                        "use export.int8: static or dynamic")
    return n


def release(model: nn.Module) -> None:
    """Plain modules again: the simulation and its range buffers removed, the fine-tuned weights kept."""
    for m, _, _ in layers(model):
        if RANGE in m._buffers:
            del m._buffers[RANGE]
            del m.forward  # the instance attribute; the class's forward is back
