"""Image classifiers for `task: image`: torch-only defaults, timm models by name, and MAC counting.

Every net maps (B, C, S, S) float images, already normalised, to logits (B, K). The registered
architectures use only torch (Conv2d, BatchNorm2d, Linear, ReLU, Hardswish, Hardsigmoid, pooling), so
they build where torchvision cannot import, export to ONNX and quantize to int8 QDQ in ONNX Runtime:

- `resnet`: the teacher; a ResNet with basic blocks (He et al. 2016), CIFAR-style stem for small images.
- `mobilenet`: the student; MobileNetV3-small-like (Howard et al. 2019) inverted residuals with SE.
- `cnn`: a three-layer plain CNN, the baseline-size student.

`timm:<model name>` builds any timm model when `import timm` works (it needs a torchvision matching
torch), and `package.module:factory` a user's own, called as factory(channels, n_classes, image_size,
**options). Every resolution choice (strides, stems) is made from `image_size` when the net is built,
never from the data, so the graph traces to ONNX with a dynamic batch.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from kd_core.errors import UserError
from kd_core.models import Catalog

# factory(channels, n_classes, image_size, **options) -> nn.Module taking (B, C, S, S) -> (B, K)
ImageFactory = Callable[..., nn.Module]

NETS: Catalog[ImageFactory] = Catalog("image architecture")

TIMM_PREFIX = "timm:"
SMALL_IMAGE = 64  # px: up to this size the stem keeps full resolution (CIFAR-style); above, it downsamples
MIN_SPATIAL = 4  # mobilenet drops a stride that would leave less than 4x4 before pooling


def build_net(arch: str, options: dict[str, Any], channels: int, n_classes: int, image_size: int) -> nn.Module:
    """The net `arch` names for (B, channels, image_size, image_size) images and `n_classes` classes.

    `arch` is a registered name (NETS), `timm:<model name>` or `package.module:factory`; a missing timm,
    an unknown name and options the factory rejects are one-line UserErrors. Seed before calling for a
    repeatable init (torch.manual_seed).
    """
    if arch.startswith(TIMM_PREFIX):
        return _timm_net(arch, options, channels, n_classes)
    factory = NETS.get(arch)  # registered, or imported from package.module:factory; else a UserError
    try:
        return factory(channels, n_classes, image_size, **options)
    except TypeError as exc:
        raise UserError(f"architecture {arch!r} rejected its options {options}: {exc}") from None


@functools.cache
def timm_available() -> str | None:
    """None when `import timm` works, else why not (the exception's first line). Cached: an import is
    tried once per process (a failed one would fail the same way again)."""
    try:
        import timm  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - timm fails through torchvision with any exception type
        return _first_line(exc)
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _timm_net(arch: str, options: dict[str, Any], channels: int, n_classes: int) -> nn.Module:
    """timm.create_model(name) with our classes and channels; weights are never downloaded here (a
    pretrained teacher is the user's checkpoint file, loaded like any other)."""
    reason = timm_available()
    if reason is not None:
        raise UserError(f"student.arch {arch}: timm is not importable ({reason}); install a matching torch + "
                        f"torchvision pair (pip install torch torchvision timm), or use one of {NETS.names()}")
    import timm

    name = arch[len(TIMM_PREFIX):]
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5] or difflib.get_close_matches(name, timm.list_models(), 5, 0.7)
        raise UserError(f"{arch}: timm has no model {name!r}" + (f"; close names: {close}" if close else ""))
    try:
        return timm.create_model(name, pretrained=False, num_classes=n_classes, in_chans=channels, **options)
    except TypeError as exc:
        raise UserError(f"architecture {arch!r} rejected its options {options}: {exc}") from None


def macs(net: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass over `example` (a batch of one gives MACs per image).

    Counted on Conv2d (output elements x in_channels/groups x kh x kw) and Linear (output elements x
    in_features), which carry all but a rounding error of a CNN's arithmetic. The net runs in eval
    mode (batch-norm statistics untouched); every module gets its former mode back.
    """
    total = 0

    def count(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output.numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            total += output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in net.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    modes = {m: m.training for m in net.modules()}
    try:
        net.eval()
        with torch.no_grad():
            net(example)
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return total


def conv_bn(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1,
            act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    """Conv (no bias: the batch norm has one) -> BatchNorm -> activation; 'same' padding for odd k."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(c_out)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


def _init(net: nn.Module) -> None:
    """He-normal convs (fan-out, as torchvision's ResNet and MobileNet) and unit batch norms; linears keep
    torch's default (uniform in ±1/sqrt(fan_in))."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """Two 3x3 conv-bn, added to the input (a strided 1x1 conv-bn when the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_bn(c_in, c_out, 3, stride), conv_bn(c_out, c_out, 3, act=None))
        self.shortcut = (nn.Identity() if stride == 1 and c_in == c_out
                         else conv_bn(c_in, c_out, 1, stride, act=None))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H/s, W/s)
        return self.relu(self.body(x) + self.shortcut(x))


@NETS.register("resnet")
class ResNet(nn.Module):
    """ResNet with basic blocks: the default teacher.

    Images up to 64 px keep full resolution through a 3x3 stem (CIFAR-style) and every stage halves it
    (28 px: 28 -> 14 -> 7 -> 4), which keeps Fashion-MNIST's teacher near 22 M MACs so it trains on CPU in
    minutes; larger images get ImageNet's 7x7 stride-2 stem and 3x3 max pool, then stages at 1/4, 1/8,
    1/16. Each stage doubles the width. The last batch norm of each block starts at zero, so every block
    starts as the identity (Goyal et al. 2017), which lets the deeper variants train at a large rate.
    """

    def __init__(self, channels: int, n_classes: int, image_size: int, width: int = 32,
                 blocks: Sequence[int] = (2, 2, 2)) -> None:
        super().__init__()
        if image_size <= SMALL_IMAGE:
            self.stem: nn.Module = conv_bn(channels, width, 3)
            first_stride = 2  # the stem kept full resolution
        else:
            self.stem = nn.Sequential(conv_bn(channels, width, 7, 2), nn.MaxPool2d(3, 2, 1))
            first_stride = 1  # the stem already divided it by 4
        stages: list[nn.Module] = []
        c_in = width
        for i, n in enumerate(blocks):
            c_out = width * 2 ** i
            stages += [BasicBlock(c_in if j == 0 else c_out, c_out, (first_stride if i == 0 else 2) if j == 0 else 1)
                       for j in range(n)]
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, n_classes)
        _init(self)
        for block in self.stages.modules():
            if isinstance(block, BasicBlock):  # the body's last batch norm: the block starts as its shortcut
                nn.init.zeros_([m for m in block.body.modules() if isinstance(m, nn.BatchNorm2d)][-1].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, S, S) -> (B, K)
        h = self.stages(self.stem(x))  # (B, W·2^(n-1), S', S')
        return self.head(self.pool(h).flatten(1))


class SqueezeExcite(nn.Module):
    """Channel gates from the global mean: 1x1 conv, ReLU, 1x1 conv, Hardsigmoid (MobileNetV3)."""

    def __init__(self, c: int, c_squeeze: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(c, c_squeeze, 1)
        self.relu = nn.ReLU()
        self.expand = nn.Conv2d(c_squeeze, c, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        return x * self.gate(self.expand(self.relu(self.reduce(self.pool(x)))))  # (B, C, 1, 1) gates


class InvertedResidual(nn.Module):
    """1x1 expand, k x k depthwise, optional squeeze-excite, 1x1 linear projection; added to the input when
    the shapes match (MobileNetV2/V3)."""

    def __init__(self, c_in: int, k: int, c_exp: int, c_out: int, se: bool, act: type[nn.Module],
                 stride: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [] if c_exp == c_in else [conv_bn(c_in, c_exp, 1, act=act)]
        layers.append(conv_bn(c_exp, c_exp, k, stride, groups=c_exp, act=act))
        if se:
            layers.append(SqueezeExcite(c_exp, _divisible(c_exp / 4)))
        layers.append(conv_bn(c_exp, c_out, 1, act=None))
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out  # fixed when built: no data-dependent branch

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, H, W) -> (B, C_out, H/s, W/s)
        y = self.block(x)
        return x + y if self.residual else y


def _divisible(c: float, by: int = 8) -> int:
    """Channels rounded to a multiple of 8 (never below 8, never 10% under `c`), as MobileNets do."""
    out = max(by, int(c + by / 2) // by * by)
    return out + by if out < 0.9 * c else out


RE, HS = nn.ReLU, nn.Hardswish
# MobileNetV3-small's block table (Howard et al. 2019, Table 2) with its late, wide blocks narrowed: at
# 28 px the last stage runs at 4x4 rather than 7x7 -> 1x1, where V3-small's 576-wide expansions would
# cost more than the rest of the net; this keeps the student at 1/10 of the resnet teacher's MACs.
#            k, expand, out, SE,   act, stride
MOBILENET = ((3, 16, 16, True, RE, 2),
             (3, 64, 24, False, RE, 2),
             (3, 72, 24, False, RE, 1),
             (5, 96, 40, True, HS, 2),
             (5, 144, 40, True, HS, 1),
             (5, 144, 48, True, HS, 2),
             (5, 192, 48, True, HS, 1))
MOBILENET_STEM, MOBILENET_LAST, MOBILENET_HIDDEN = 16, 192, 256


@NETS.register("mobilenet")
class MobileNet(nn.Module):
    """MobileNetV3-small-like: Hardswish stem, inverted residual blocks (SE gates with Hardsigmoid), a 1x1
    conv, global pooling and a two-layer head. The default student.

    `width` scales every layer's channels (rounded to multiples of 8). `stride_stem` is 1 for images up
    to 64 px (as the resnet's stem) and 2 above; a block's stride is dropped where it would leave less
    than 4x4 before pooling (28 px: 28 -> 14 -> 7 -> 4 -> 4).
    """

    def __init__(self, channels: int, n_classes: int, image_size: int, width: float = 1.0,
                 stride_stem: int | None = None, dropout: float = 0.2) -> None:
        super().__init__()
        if stride_stem is None:
            stride_stem = 1 if image_size <= SMALL_IMAGE else 2
        c = _divisible(MOBILENET_STEM * width)
        self.stem = conv_bn(channels, c, 3, stride_stem, act=HS)
        size = -(-image_size // stride_stem)  # ceil: a padded 'same' conv of stride s
        blocks: list[nn.Module] = []
        for k, c_exp, c_out, se, act, stride in MOBILENET:
            if stride == 2 and -(-size // 2) < MIN_SPATIAL:
                stride = 1
            size = -(-size // stride)
            blocks.append(InvertedResidual(c, k, _divisible(c_exp * width), _divisible(c_out * width), se, act,
                                           stride))
            c = _divisible(c_out * width)
        self.blocks = nn.Sequential(*blocks)
        c_last = _divisible(MOBILENET_LAST * width)
        self.last = conv_bn(c, c_last, 1, act=HS)
        self.pool = nn.AdaptiveAvgPool2d(1)
        hidden = _divisible(MOBILENET_HIDDEN * max(width, 1.0))  # V3 keeps its head wide when narrowed
        self.head = nn.Sequential(nn.Linear(c_last, hidden), HS(), nn.Dropout(dropout), nn.Linear(hidden, n_classes))
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, S, S) -> (B, K)
        h = self.last(self.blocks(self.stem(x)))  # (B, C_last, S', S')
        return self.head(self.pool(h).flatten(1))


@NETS.register("cnn")
class TinyCNN(nn.Module):
    """Three conv-bn-ReLU layers (width, 2·width, 2·width) with 2x2 max pooling between them, global mean
    pooling and a linear head: the plain, baseline-size student. Above 64 px the first conv has stride 2,
    as the other nets' stems, so its cost stays in proportion to theirs."""

    def __init__(self, channels: int, n_classes: int, image_size: int, width: int = 16) -> None:
        super().__init__()
        stride = 1 if image_size <= SMALL_IMAGE else 2
        self.features = nn.Sequential(
            conv_bn(channels, width, 3, stride), nn.MaxPool2d(2),  # (B, W, S/2, S/2)
            conv_bn(width, 2 * width, 3), nn.MaxPool2d(2),  # (B, 2W, S/4, S/4)
            conv_bn(2 * width, 2 * width, 3),  # (B, 2W, S/4, S/4)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(2 * width, n_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, S, S) -> (B, K)
        return self.head(self.pool(self.features(x)).flatten(1))


__all__ = ["NETS", "BasicBlock", "InvertedResidual", "MobileNet", "ResNet", "SqueezeExcite", "TinyCNN",
           "build_net", "conv_bn", "macs", "timm_available"]
