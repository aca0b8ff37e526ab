"""QAD simulates int8 wherever the int8 export rounds a weight, not only in nn.Linear: the cnn1d
architecture's Conv1d and GPT-2's transformers Conv1D are fake-quantized too; a student computing
with a weight QAD cannot round is refused; the export lineage records how many layers were simulated."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from kd_core import data, models, qad
from kd_core.errors import UserError


def _int8_per_channel(w: torch.Tensor, axis: int) -> torch.Tensor:
    """Independent reference: round w to symmetric int8 per slice along `axis`."""
    moved = w.movedim(axis, 0)
    scale = moved.abs().reshape(len(moved), -1).amax(1).clamp_min(1e-8) / 127  # (out,)
    shape = (-1,) + (1,) * (moved.dim() - 1)
    return (torch.clamp(torch.round(moved / scale.view(shape)), -127, 127) * scale.view(shape)).movedim(0, axis)


def _uint8_per_tensor(x: torch.Tensor) -> torch.Tensor:
    """Independent reference: x on the uint8 grid of its own [min(x, 0), max(x, 0)] (the first batch's range)."""
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (hi - lo) / 255
    zero = round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


def test_cnn1d_convolutions_are_simulated():
    torch.manual_seed(0)
    net = models.CNN1d(40, 10, channels=8, layers=3)
    x = torch.randn(16, 40)
    plain = net(x).detach()
    assert qad.simulate(net) == 4  # three Conv1d and the Linear head
    convs = [m for m in net.convs if isinstance(m, nn.Conv1d)]
    assert all(qad.RANGE in m._buffers for m in convs)
    net.train()
    first = convs[0]
    x1 = x.unsqueeze(1)  # (B, 1, F): what the first convolution reads
    want = nn.functional.conv1d(_uint8_per_tensor(x1), _int8_per_channel(first.weight.detach(), 0), first.bias,
                                stride=2, padding=2)
    torch.testing.assert_close(first(x1).detach(), want, rtol=1e-4, atol=1e-5)
    out = net(x)
    assert 0 < (out.detach() - plain).abs().max() < 0.5  # rounded, not broken
    out.sum().backward()
    assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in convs)  # straight through
    qad.release(net)
    assert not any(qad.RANGE in k for k in net.state_dict())
    torch.testing.assert_close(net(x), net.head(net.convs(x.unsqueeze(1)).flatten(1)))


def test_transformers_conv1d_is_a_linear_with_its_weight_transposed():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(5, 4)  # nf=5 outputs, nx=4 inputs: weight (4, 5)
    nn.init.normal_(layer.weight)
    x = torch.randn(3, 7, 4)
    assert qad.simulate(nn.Sequential(layer)) == 1
    layer.train()
    want = _uint8_per_tensor(x) @ _int8_per_channel(layer.weight.detach(), 1) + layer.bias
    torch.testing.assert_close(layer(x).detach(), want, rtol=1e-4, atol=1e-5)


def test_a_gpt2_student_is_simulated_in_every_conv1d():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=8, n_layer=2, n_head=2))
    assert qad.simulate(model) == 2 * 4 + 1  # c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj per block; lm_head
    model.train()
    model(torch.randint(0, 32, (2, 6))).logits.sum().backward()
    qad.release(model)
    assert not any(qad.RANGE in k for k in model.state_dict())


def test_a_weight_qad_cannot_round_is_refused_before_anything_changes():
    model = nn.Sequential(nn.Linear(4, 4), nn.Unflatten(1, (4, 1)), nn.ConvTranspose1d(4, 2, 3),
                          nn.ConvTranspose1d(2, 2, 3))
    with pytest.raises(UserError, match=r"this student also computes with ConvTranspose1d ×2: use export\.int8") as e:
        qad.simulate(model)
    assert "\n" not in str(e.value)
    assert not any(qad.RANGE in k for k in model.state_dict())
    with pytest.raises(UserError, match="no Linear or Conv layer"):
        qad.simulate(nn.Sequential(nn.Embedding(4, 2), nn.LayerNorm(2)))


def test_qad_lineage_counts_the_simulated_layers(tmp_path, monkeypatch):
    """`_qad` records how many layers ran with int8 simulated (the training itself stubbed out)."""
    from kd_core import tasks
    from kd_core.config import load_params
    from kd_core.stages import export as stage
    from tests.conftest import ROOT

    schema = data.Schema(tuple(f"x{i}" for i in range(40)), "label", tuple(range(10)))
    spec = models.ModelSpec("cnn1d", {"channels": 8, "layers": 2}, schema)
    models.save(models.build(spec, seed=0), spec, tmp_path / "student")
    rows = SimpleNamespace(extent=lambda d: 4, x=np.zeros((4, 40), np.float32), y=np.zeros(4, np.int64), val=None,
                           lengths=None, keys=["key"])
    seen = []
    monkeypatch.setattr(stage, "kd_rows", lambda *a: rows)
    monkeypatch.setattr(stage, "kd_objective", lambda *a: (None, None))
    monkeypatch.setattr(stage, "fit", lambda model, *a, **k: seen.append(model) or [{"val_accuracy": 0.5}])
    lineage = stage._qad(load_params(ROOT), tmp_path, tasks.get("tabular"), None, tmp_path / "student",
                         tmp_path / "out")
    assert lineage["qad_simulated_layers"] == "3"  # two Conv1d, one Linear
    assert sum(qad.RANGE in m._buffers for m in seen[0].modules()) == 0  # released before saving
    assert (tmp_path / "out" / models.WEIGHTS_FILE).is_file()
