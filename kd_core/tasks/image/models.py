"""Image classifiers for `task: image`: a network (kd_core.tasks.image.nets: torch-only architectures, any
timm model, a user factory) behind the normalisation the data fixed, and their directory.

`ImageClassifier` takes raw pixels (uint8 or float in 0..255) as (B, C, S, S), or a batch of rows of V
views as (B, V, C, S, S) (the student replaying a view cache, kd_core.tasks.image.views), and returns
logits (B, K) or (B, V, K). The normalisation (the training pixels' per-channel mean and std) is part of
the model, so a served or exported model reads pixels as they are decoded.

A model directory holds `model.safetensors` (the network's own weights under its own names, never a
pickle) and `model.json` (kd's spec: arch, options, classes, image size, channels, mean and std). A timm
architecture also gets timm's `config.json`, so `timm.create_model("local-dir:<dir>", pretrained=True)`
loads the student as timm's own model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kd_core.data import Schema
from kd_core.errors import UserError
from kd_core.models import META_FILE, WEIGHTS_FILE, ModelSpec, load_into, read_state
from kd_core.tasks._hf import CONFIG_FILE
from kd_core.tasks.image import nets, views

TIMM_PREFIX = "timm:"


class ImageClassifier(nn.Module):
    """Pixels (B, C, S, S) or views (B, V, C, S, S), 0..255 -> logits (B, K) or (B, V, K)."""

    mean: torch.Tensor  # (1, C, 1, 1) buffers, in pixel units
    std: torch.Tensor

    def __init__(self, net: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.net = net
        self.augment: dict | None = None  # cache.augment while training on plain images (teacher, twin)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1) * 255)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-3]  # (B,) or (B, V)
        pixels = x.reshape(-1, *x.shape[-3:]).float()  # (B·V, C, S, S)
        if self.training and self.augment is not None and x.dim() == 4:  # plain images: a fresh view each step
            pixels = views.random_views(pixels, self.augment)
        logits = self.net((pixels - self.mean) / self.std)  # (B·V, K)
        return logits.reshape(*lead, logits.shape[-1])


def build(spec: ModelSpec, seed: int | None) -> ImageClassifier:
    """A fresh model of `spec` (seeded), normalised with the data's statistics."""
    info = spec.schema.image_info
    if seed is not None:
        torch.manual_seed(seed)
    net = nets.build_net(spec.arch, dict(spec.options), info["channels"], len(spec.schema.classes), info["size"])
    return ImageClassifier(net, info["mean"], info["std"])


def save(model: ImageClassifier, spec: ModelSpec, out: Path) -> None:
    """The network's weights under its own names, kd's spec beside; timm's config.json for a timm arch."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    (out / META_FILE).write_text(json.dumps(spec.to_json(), indent=2))
    if spec.arch.startswith(TIMM_PREFIX):
        (out / CONFIG_FILE).write_text(json.dumps(timm_config(spec), indent=2))


def timm_config(spec: ModelSpec) -> dict:
    """timm's Hugging Face config.json: what `create_model("local-dir:…")` rebuilds the model from."""
    info, classes = spec.schema.image_info, [str(c) for c in spec.schema.classes]
    return {"architecture": spec.arch.removeprefix(TIMM_PREFIX), "num_classes": len(classes),
            "model_args": {"in_chans": info["channels"], **spec.options},
            "pretrained_cfg": {"input_size": [info["channels"], info["size"], info["size"]],
                               "mean": info["mean"], "std": info["std"], "interpolation": "bilinear",
                               "crop_pct": 1.0, "num_classes": len(classes), "label_names": classes}}


def load(path: Path) -> tuple[ImageClassifier, ModelSpec]:
    """A kd image model directory; weights through safetensors, so loading never executes code."""
    weights = path / WEIGHTS_FILE
    if not weights.is_file() or not (path / META_FILE).is_file():
        raise UserError(f"{path} is not a kd image model directory (needs {META_FILE} and {WEIGHTS_FILE})")
    meta = json.loads((path / META_FILE).read_text())
    spec = ModelSpec(meta["arch"], meta.get("options", {}), Schema.from_json(meta), meta.get("task", "image"))
    model = build(spec, None)
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{weights}: not a valid safetensors file: {exc}") from None
    load_into(model.net, state, f"{weights} does not match architecture {spec.arch!r} {spec.options}")
    return model.eval(), spec


def load_weights(model: ImageClassifier, path: Path, arch: str) -> None:
    """A user's weights file (safetensors; .pt/.pth opened with weights_only) into `model`'s network."""
    state = read_state(path)
    if all(k.startswith("net.") for k in state):  # a whole kd model's state dict
        state = {k.removeprefix("net."): v for k, v in state.items() if k not in ("mean", "std")}
    load_into(model.net, state, f"{path} does not match architecture {arch!r}")


def adopt_timm_dir(src: Path, schema: Schema, task: str, out: Path) -> ImageClassifier:
    """A timm model directory as a kd teacher: its architecture, input size and classes checked against
    the data, its weights read through safetensors, normalised with the data's statistics."""
    try:
        config = json.loads((src / CONFIG_FILE).read_text())
        arch, cfg = config["architecture"], config.get("pretrained_cfg", {})
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{src / CONFIG_FILE}: not a timm model config (no `architecture`)") from None
    info = schema.image_info
    size = cfg.get("input_size", [info["channels"], info["size"], info["size"]])
    if list(size) != [info["channels"], info["size"], info["size"]]:
        raise UserError(f"teacher {src} reads images of {list(size)} (C, H, W), the data is "
                        f"{[info['channels'], info['size'], info['size']]}: set data.image_size and data.channels")
    if config.get("num_classes", len(schema.classes)) != len(schema.classes):
        raise UserError(f"teacher {src} has {config.get('num_classes')} classes, the data {len(schema.classes)}")
    args = {k: v for k, v in config.get("model_args", {}).items() if k != "in_chans"}
    spec = ModelSpec(TIMM_PREFIX + arch, args, schema, task)
    model = build(spec, None)
    load_weights(model, src / WEIGHTS_FILE, spec.arch)
    save(model.eval(), spec, out)
    return model


@torch.inference_mode()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Logits of pixel rows on the CPU, in batches; rows of views give one row of logits per view.
    # (N, C, S, S) -> (N, K); (N, V, C, S, S) -> (N·V, K)"""
    model.eval()
    out = [model(torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size]))).float()
           for i in range(0, len(x), batch_size)]
    if not out:
        return np.zeros((0, 0), np.float32)
    return torch.cat([o.reshape(-1, o.shape[-1]) for o in out]).numpy()
