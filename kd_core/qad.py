"""Quantization-aware distillation: the student fine-tuned through simulated int8, against the cached teacher.

Post-training quantization rounds weights and activations the network never saw rounded; a short
fine-tune with the rounding in the forward pass lets the weights settle where int8 loses least (Jacob
et al. 2018; NVIDIA ModelOpt's QAD does this for large models). Every `nn.Linear` computes
`linear(fq(x), fq(W), b)` — weights per output channel, symmetric int8 in [-127, 127] like ONNX
Runtime's per-channel weights; inputs per tensor, asymmetric uint8 with ranges tracked as a moving
average of each batch's min and max (frozen in eval mode) like its calibrated activations. Gradients
pass straight through the rounding (PyTorch's fake-quantize ops). The simulation lives on the modules
only while training: `release` restores plain modules, whose weights are the fine-tuned float ones
the static int8 export then quantizes. Tied weights stay tied (the module's own Parameter is rounded).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

RANGE = "qad_input_range"  # buffer on each simulated Linear: [min, max] of its input; in checkpoints
MOMENTUM = 0.01  # moving average of the input range, as torch.ao's MovingAverageMinMaxObserver
W_MAX = 127  # symmetric int8 weights
A_LEVELS = 255  # uint8 activations


def fake_weight(w: torch.Tensor) -> torch.Tensor:
    """w rounded to int8 per output channel (row), symmetric.  # (out, in) -> (out, in)"""
    scale = (w.detach().abs().amax(dim=1).clamp_min(1e-8) / W_MAX).float()  # (out,)
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w.float(), scale, zero, 0, -W_MAX, W_MAX).to(w.dtype)


def fake_input(x: torch.Tensor, rng: torch.Tensor) -> torch.Tensor:
    """x rounded to uint8 over [min(rng[0], 0), max(rng[1], 0)] (zero exactly representable).  # (..., in)"""
    lo, hi = rng[0].clamp(max=0.0), rng[1].clamp(min=0.0)
    scale = ((hi - lo) / A_LEVELS).clamp_min(1e-8).float()
    zero = torch.round(-lo / scale).clamp(0, A_LEVELS).to(torch.int32)
    return torch.fake_quantize_per_tensor_affine(x.float(), scale, zero, 0, A_LEVELS).to(x.dtype)


def _observe(module: nn.Linear, x: torch.Tensor) -> None:
    """Training mode: move the input range toward this batch's (the first batch sets it)."""
    with torch.no_grad():
        now = torch.stack([x.detach().min(), x.detach().max()]).float()
        rng = getattr(module, RANGE)
        if torch.isnan(rng).any():
            rng.copy_(now)
        else:
            rng.lerp_(now, MOMENTUM)


def _simulated_forward(module: nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        if module.training:
            _observe(module, x)
        return nn.functional.linear(fake_input(x, getattr(module, RANGE)), fake_weight(module.weight), module.bias)
    return forward


def linears(model: nn.Module) -> Iterator[nn.Linear]:
    return (m for m in model.modules() if isinstance(m, nn.Linear))


def simulate(model: nn.Module) -> int:
    """Put int8 simulation on every Linear of `model`, in place; returns how many. The input ranges
    start unknown (NaN) and are buffers, so a checkpoint of the model carries them."""
    n = 0
    for m in linears(model):
        m.register_buffer(RANGE, torch.full((2,), float("nan"), device=m.weight.device))
        m.forward = _simulated_forward(m)
        n += 1
    return n


def release(model: nn.Module) -> None:
    """Plain modules again: the simulation and its range buffers removed, the fine-tuned weights kept."""
    for m in linears(model):
        if RANGE in m._buffers:
            del m._buffers[RANGE]
            del m.forward  # the instance attribute; the class's forward is back
