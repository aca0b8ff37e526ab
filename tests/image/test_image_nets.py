"""Image nets (kd_core.tasks.image.nets) on CPU at tiny sizes: every registered net builds for any channels,
size and class count, costs what the students promise (a tenth of the teacher's MACs), exports to ONNX and
int8 QDQ, learns, and every way of naming an architecture (registered, timm:, package.module:factory)
either builds or fails in one line."""

from __future__ import annotations

import re
import sys
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from kd_core.errors import UserError
from kd_core.tasks.image import nets
from kd_core.tasks.image.nets import NETS, build_net, macs, timm_available

ARCHS = NETS.names()
INPUT, OUTPUT = "images", "logits"


def example(channels: int, size: int, batch: int = 1, seed: int = 0) -> torch.Tensor:
    """Normalised-looking images.  # (B, C, S, S)"""
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def built(arch: str, channels: int = 1, n_classes: int = 10, size: int = 28, seed: int = 0,
          **options: Any) -> nn.Module:
    torch.manual_seed(seed)
    return build_net(arch, options, channels, n_classes, size)


def test_the_defaults_are_registered() -> None:
    assert {"resnet", "mobilenet", "cnn"} <= set(ARCHS)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", [8, 28, 64, 96])
def test_builds_for_any_channels_size_and_classes(arch: str, size: int) -> None:
    for channels in (1, 3):
        for n_classes in (2, 20):
            net = built(arch, channels, n_classes, size)
            x = example(channels, size, batch=2)
            out = net.train()(x)  # batch statistics even where the last stage is 1x1 (8 px)
            assert out.shape == (2, n_classes)
            out = net.eval()(x)
            assert out.shape == (2, n_classes) and out.dtype == torch.float32 and torch.isfinite(out).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_init_is_deterministic_under_a_seed(arch: str) -> None:
    a, b, c = built(arch, seed=1).state_dict(), built(arch, seed=1).state_dict(), built(arch, seed=2).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_options_change_the_nets() -> None:
    wide, narrow = built("resnet", width=16, blocks=(1, 1)), built("resnet")
    assert macs(wide, example(1, 28)) < macs(narrow, example(1, 28))
    assert built("resnet", blocks=[1, 1, 1, 1])(example(1, 28, 2)).shape == (2, 10)  # a YAML list works
    assert macs(built("mobilenet", width=0.5), example(1, 28)) < macs(built("mobilenet"), example(1, 28))
    assert macs(built("cnn", width=8), example(1, 28)) < macs(built("cnn"), example(1, 28))
    forced = built("mobilenet", size=28, stride_stem=2)
    assert macs(forced, example(1, 28)) < macs(built("mobilenet"), example(1, 28))


def test_macs_counts_convs_and_linears() -> None:
    """By hand: a 3x3 conv 3->8 on 10x10 (padding 1), a depthwise 3x3 on 8 channels (no padding: 8x8),
    a linear 512->5; the batch norm's statistics are untouched and the mode is restored."""
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3, groups=8),
                        nn.Flatten(), nn.Linear(8 * 8 * 8, 5)).train()
    before = net[1].running_mean.clone()
    net[4].eval()  # a module left in its own mode keeps it
    assert macs(net, torch.randn(1, 3, 10, 10)) == 8 * 10 * 10 * 3 * 9 + 8 * 8 * 8 * 1 * 9 + 5 * 512
    assert macs(net, torch.randn(4, 3, 10, 10)) == 4 * (8 * 10 * 10 * 3 * 9 + 8 * 8 * 8 * 9 + 5 * 512)
    assert net.training and net[1].training and not net[4].training
    assert torch.equal(net[1].running_mean, before)


def test_students_cost_a_tenth_of_the_teacher() -> None:
    """Fashion-MNIST (28x28 greyscale, 10 classes): the resnet teacher stays cheap enough for CPU and both
    students are at most a tenth of it; the same holds for colour images of other sizes."""
    cost = {a: macs(built(a), example(1, 28)) for a in ("resnet", "mobilenet", "cnn")}
    assert 20e6 <= cost["resnet"] <= 60e6, cost
    assert cost["mobilenet"] <= cost["resnet"] / 10, cost
    assert cost["cnn"] <= cost["resnet"] / 10, cost
    for size in (32, 64, 96):
        rgb = {a: macs(built(a, 3, 10, size), example(3, size)) for a in ("resnet", "mobilenet", "cnn")}
        assert max(rgb["mobilenet"], rgb["cnn"]) <= rgb["resnet"] / 10, (size, rgb)


def test_mobilenet_keeps_four_by_four_before_pooling() -> None:
    seen: list[tuple[int, ...]] = []
    net = built("mobilenet").eval()
    net.pool.register_forward_hook(lambda _m, inputs, _o: seen.append(tuple(inputs[0].shape[2:])))
    net(example(1, 28))
    assert seen == [(4, 4)]


def _export(net: nn.Module, path: Path, x: torch.Tensor) -> None:
    """As kd_core.export.to_onnx: the dynamo exporter, a dynamic batch, one self-contained file."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), str(path), input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, external_data=False,
                          verbose=False)


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run([OUTPUT], {INPUT: x})[0]


@pytest.mark.parametrize(("arch", "channels", "size"), [(a, 1, 28) for a in ARCHS] + [("resnet", 3, 96)])
def test_exports_to_onnx_and_int8(arch: str, channels: int, size: int, tmp_path: Path) -> None:
    """fp32 ONNX matches torch within 1e-4 on another batch size than the traced one; the static int8 QDQ
    form (ONNX Runtime, as kd_core.quantize writes it) runs on integer kernels and keeps the shape."""
    import onnx

    from kd_core.quantize import quantize

    net = built(arch, channels, 10, size)
    _warm_batch_norm(net, channels, size)
    net.eval()
    fp32, int8 = tmp_path / "model.onnx", tmp_path / "int8.onnx"
    _export(net, fp32, example(channels, size, batch=2))
    model = onnx.load(str(fp32))
    onnx.checker.check_model(model)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    x = example(channels, size, batch=3, seed=1)
    with torch.no_grad():
        want = net(x).numpy()
    got = _run(fp32, x.numpy())
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)

    quantize(fp32, int8, "minmax", INPUT, example(channels, size, batch=32, seed=2).numpy())
    ops = {n.op_type for n in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    q = _run(int8, x.numpy())
    assert q.shape == want.shape and np.isfinite(q).all()


def _warm_batch_norm(net: nn.Module, channels: int, size: int) -> None:
    """A few training-mode passes so batch norms hold non-trivial statistics (and the zero-initialised
    residual gammas get moved): a fresh net's identity batch norms would hide export mistakes."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    net.train()
    with torch.no_grad():
        for seed in range(3):
            net(example(channels, size, batch=4, seed=10 + seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_nets_learn(arch: str) -> None:
    """A few SGD steps on one random batch of 2-class images lower the loss: gradients reach every layer."""
    net = built(arch, 1, 2, 16).train()
    x, y = example(1, 16, batch=16), torch.arange(16) % 2
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(20):
        loss = nn.functional.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_an_unknown_arch_is_one_line() -> None:
    with pytest.raises(UserError, match=r"unknown image architecture 'resnt'; choose one of .*'resnet'") as err:
        build_net("resnt", {}, 1, 10, 28)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("arch", ARCHS)
def test_a_bad_option_names_the_arch_and_options(arch: str) -> None:
    with pytest.raises(UserError, match=rf"architecture '{arch}' rejected its options {{'depth': 3}}") as err:
        build_net(arch, {"depth": 3}, 1, 10, 28)
    assert "\n" not in str(err.value)


class UserNet(nn.Module):
    def __init__(self, channels: int, n_classes: int, image_size: int, hidden: int = 4) -> None:
        super().__init__()
        self.size = image_size
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(channels * image_size * image_size, hidden), nn.ReLU(),
                                  nn.Linear(hidden, n_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, S, S) -> (B, K)
        return self.body(x)


def user_net(channels: int, n_classes: int, image_size: int, hidden: int = 4) -> nn.Module:
    """A user's factory, named in params.yaml as package.module:factory."""
    return UserNet(channels, n_classes, image_size, hidden)


def test_a_user_factory_by_module_path() -> None:
    net = build_net(f"{__name__}:user_net", {"hidden": 7}, 3, 5, 12)
    assert isinstance(net, UserNet) and net.size == 12 and net.body[1].out_features == 7
    assert net(example(3, 12, batch=2)).shape == (2, 5)
    with pytest.raises(UserError, match="rejected its options"):
        build_net(f"{__name__}:user_net", {"depth": 2}, 3, 5, 12)
    with pytest.raises(UserError, match="cannot be imported"):
        build_net(f"{__name__}:no_such_factory", {}, 3, 5, 12)
    with pytest.raises(UserError, match="cannot be imported"):
        build_net("no_such_package_kd.nets:factory", {}, 3, 5, 12)


def test_timm_available_is_none_or_one_line() -> None:
    reason = timm_available()
    assert reason is None or (isinstance(reason, str) and reason and "\n" not in reason)
    assert timm_available() is reason or timm_available() == reason  # cached


def test_timm_models_build_when_timm_imports() -> None:
    reason = timm_available()
    if reason is not None:
        pytest.skip(f"timm is not importable: {reason}")
    resnet = build_net("timm:resnet18", {}, 1, 10, 32).eval()
    assert resnet(example(1, 32, batch=2)).shape == (2, 10)
    mobile = build_net("timm:mobilenetv3_small_050", {}, 3, 4, 32).eval()
    assert mobile(example(3, 32, batch=2)).shape == (2, 4)
    assert macs(mobile, example(3, 32)) > 0
    with pytest.raises(UserError, match=r"timm has no model 'resnet18x'; close names: \[.*resnet18"):
        build_net("timm:resnet18x", {}, 1, 10, 32)
    with pytest.raises(UserError, match="rejected its options"):
        build_net("timm:resnet18", {"no_such_option": 1}, 1, 10, 32)


def test_timm_missing_is_one_line() -> None:
    reason = timm_available()
    if reason is None:
        pytest.skip("timm imports here")
    with pytest.raises(UserError) as err:
        build_net("timm:resnet18", {}, 1, 10, 28)
    assert str(err.value) == (f"student.arch timm:resnet18: timm is not importable ({reason}); install a matching "
                              f"torch + torchvision pair (pip install torch torchvision timm), or use one of "
                              f"{NETS.names()}")


@pytest.fixture
def fake_timm(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.SimpleNamespace]:
    """A stand-in `timm` module, so the timm path is exercised where the real one cannot import."""
    calls: list[tuple[str, dict]] = []

    def create_model(name: str, **kwargs: Any) -> nn.Module:
        calls.append((name, kwargs))
        unknown = set(kwargs) - {"pretrained", "num_classes", "in_chans", "drop_rate"}
        if unknown:
            raise TypeError(f"__init__() got an unexpected keyword argument {sorted(unknown)[0]!r}")
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(kwargs["in_chans"],
                                                                               kwargs["num_classes"]))

    names = ["resnet18", "resnet18d", "resnet34", "mobilenetv3_small_050"]
    module = types.ModuleType("timm")
    module.create_model = create_model  # type: ignore[attr-defined]
    module.is_model = lambda name: name in names  # type: ignore[attr-defined]
    module.list_models = lambda pattern="*": [n for n in names if pattern.strip("*") in n]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "timm", module)
    timm_available.cache_clear()
    yield types.SimpleNamespace(calls=calls)
    timm_available.cache_clear()  # the real answer again for later tests


def test_the_timm_path_with_a_stand_in(fake_timm: types.SimpleNamespace) -> None:
    assert timm_available() is None
    net = build_net("timm:resnet18", {"drop_rate": 0.1}, 1, 7, 28)
    assert net(example(1, 28, batch=2)).shape == (2, 7)
    assert fake_timm.calls == [("resnet18", {"pretrained": False, "num_classes": 7, "in_chans": 1, "drop_rate": 0.1})]
    with pytest.raises(UserError, match=r"timm:resnet1: timm has no model 'resnet1'; close names: \['resnet18', "):
        build_net("timm:resnet1", {}, 1, 7, 28)
    with pytest.raises(UserError, match=r"timm has no model 'resnt18'; close names: \['resnet18', "):  # a typo
        build_net("timm:resnt18", {}, 1, 7, 28)
    with pytest.raises(UserError, match=r"architecture 'timm:resnet18' rejected its options \{'depth': 2\}"):
        build_net("timm:resnet18", {"depth": 2}, 1, 7, 28)


def test_a_missing_timm_names_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nets, "timm_available", lambda: "No module named 'timm'")
    with pytest.raises(UserError, match=r"^student\.arch timm:x: timm is not importable \(No module named 'timm'\);"
                                        rf" install .* or use one of {re.escape(str(NETS.names()))}$"):
        build_net("timm:x", {}, 3, 10, 64)
