"""Architecture registry and the on-disk model format.

A model directory holds `model.safetensors` (weights, never a pickle) and `model.json` (architecture,
options, feature order, class names). The standardisation fitted on the training rows is the first
layer of the network, so a loaded model takes raw rows and returns logits over the named classes.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from kd_core.data import Schema
from kd_core.errors import UserError

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"

Factory = Callable[..., nn.Module]  # factory(n_features, n_classes, **options) -> nn.Module


T = TypeVar("T", bound=Callable)


class Catalog(Generic[T]):
    """Names -> factories (architectures, losses), filled by explicit decoration so the list of choices is
    greppable. Not to be confused with the MLflow model registry (kd_core.registry)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(fn: T) -> T:
            self._items[name] = fn
            return fn
        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def get(self, name: str) -> T:
        if name in self._items:
            return self._items[name]
        if ":" in name:  # a user model the user named in params.yaml: package.module:factory
            module, _, attr = name.partition(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as exc:
                raise UserError(f"{self.kind} {name!r} cannot be imported: {exc}") from None
        raise UserError(f"unknown {self.kind} {name!r}; choose one of {self.names()} "
                        "or give package.module:factory")


ARCHS: Catalog[Factory] = Catalog("architecture")


@ARCHS.register("mlp")
def mlp(n_features: int, n_classes: int, hidden: Sequence[int] = (128, 64), dropout: float = 0.0) -> nn.Module:
    """Plain ReLU MLP: the small, fast student."""
    layers: list[nn.Module] = []
    width = n_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


class CNN1d(nn.Module):
    """1-D CNN over the feature axis (Greydanus 2020's MNIST-1D CNN, widened): the teacher."""

    def __init__(self, n_features: int, n_classes: int, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        convs, c_in, length = [], 1, n_features
        for i in range(layers):
            k = 5 if i == 0 else 3
            convs += [nn.Conv1d(c_in, channels, k, stride=2, padding=k // 2), nn.ReLU()]
            c_in, length = channels, (length + 2 * (k // 2) - k) // 2 + 1
        self.convs = nn.Sequential(*convs)
        self.head = nn.Linear(channels * length, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, F)
        h = self.convs(x.unsqueeze(1))  # (B, C, L)
        return self.head(h.flatten(1))  # (B, K)


ARCHS.register("cnn1d")(CNN1d)


class Standardize(nn.Module):
    """(x - mean) / std with the training rows' statistics, stored as buffers in the weights."""

    mean: torch.Tensor  # (F,) buffers
    std: torch.Tensor

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, F)
        return (x - self.mean) / self.std


class KDModel(nn.Module):
    """Raw rows -> logits: standardisation followed by the registered architecture."""

    def __init__(self, net: nn.Module, n_features: int) -> None:
        super().__init__()
        self.scale = Standardize(n_features)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B, K)
        return self.net(self.scale(x))


class Ensemble(nn.Module):
    """Several teachers as one model: their mean logits, or the log of their mean probabilities.

    Each member keeps its own standardisation (members may come from different sources), so the
    ensemble's outer KDModel scaling stays the identity.
    """

    def __init__(self, n_features: int, n_classes: int, members: list[dict[str, Any]],
                 combine: str = "logits") -> None:
        super().__init__()
        if combine not in ("logits", "probs"):
            raise TypeError(f"combine must be 'logits' or 'probs', not {combine!r}")
        self.combine = combine
        self.members = nn.ModuleList(
            KDModel(ARCHS.get(m["arch"])(n_features, n_classes, **m.get("options", {})), n_features)
            for m in members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, F) -> (B, K)
        return combine_logits(torch.stack([m(x) for m in self.members]), self.combine)  # (M, B, K) -> (B, K)


def combine_logits(z: torch.Tensor, combine: str) -> torch.Tensor:
    """Members' logits -> the ensemble's logits.  # (M, B, K) -> (B, K)

    `logits`: their mean. `probs`: log of the mean probability at T = 1, the usual ensemble prediction.
    The same function makes the evaluated ensemble teacher and the student's cached target
    (losses.ensemble_targets), so the student learns exactly the teacher eval.json scores; the KD loss
    then softens it by T like any single teacher's logits.
    """
    if combine == "logits":
        return z.mean(0)
    return torch.logsumexp(torch.log_softmax(z.float(), -1), 0) - math.log(len(z))


ARCHS.register("ensemble")(Ensemble)


# the one task named outside its package: the task of a params.yaml without `task:` and of model.json
# files of the first releases, which name none (they were all tables); kd_core.tasks.DEFAULT
DEFAULT_TASK = "tabular"


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    options: dict[str, Any]
    schema: Schema
    task: str = DEFAULT_TASK  # kd_core.tasks: what the model reads, so serving asks the right task
    # the project a relative `arch` directory (a Hugging Face config) belongs to; never saved
    root: Path | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict:
        return {"arch": self.arch, "options": self.options, "task": self.task, **self.schema.to_json()}

    def arch_dir(self) -> Path:
        return arch_dir(self.arch, self.root)


def arch_dir(arch: str, root: Path | None) -> Path:
    """`arch` as a directory: params.yaml names a relative one from the project root, so it is read
    there, whatever the working directory (`kd` from a subfolder, a flow's `root`); None: a caller
    outside any project, whose paths are the working directory's."""
    path = Path(arch).expanduser()
    return path if path.is_absolute() or root is None else root / path


def build(spec: ModelSpec, x_train: np.ndarray | None = None, seed: int | None = None) -> KDModel:
    """Instantiate `spec` (seeded: weight init is part of a repeatable run); with training rows, fit
    the standardisation to them."""
    if seed is not None:
        torch.manual_seed(seed)
    n_features, n_classes = len(spec.schema.features), len(spec.schema.classes)
    try:
        net = ARCHS.get(spec.arch)(n_features, n_classes, **spec.options)
    except TypeError as exc:
        raise UserError(f"architecture {spec.arch!r} rejected its options {spec.options}: {exc}") from None
    model = KDModel(net, n_features)
    if x_train is not None and len(x_train):
        mean = x_train.mean(axis=0)
        std = x_train.std(axis=0)
        std[std < 1e-8] = 1.0  # constant columns pass through instead of dividing by zero
        model.scale.mean.copy_(torch.from_numpy(mean))
        model.scale.std.copy_(torch.from_numpy(std))
    return model


def save(model: nn.Module, spec: ModelSpec, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE))
    (out / META_FILE).write_text(json.dumps(spec.to_json(), indent=2))


def load(path: Path) -> tuple[KDModel, ModelSpec]:
    """Load a model directory; weights via safetensors, so loading never executes code."""
    meta_path, weights = path / META_FILE, path / WEIGHTS_FILE
    if not meta_path.exists() or not weights.exists():
        raise UserError(f"{path} is not a kd model directory (needs {META_FILE} and {WEIGHTS_FILE})")
    meta = json.loads(meta_path.read_text())
    spec = ModelSpec(meta["arch"], meta.get("options", {}), Schema.from_json(meta), meta.get("task", DEFAULT_TASK))
    model = build(spec)
    try:
        state = load_file(str(weights))
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"{weights}: not a valid safetensors file: {exc}") from None
    load_into(model, state, f"{weights} does not match architecture {spec.arch!r}")
    return model.eval(), spec


CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt", ".bin")


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file; pickles are opened with weights_only=True, so code never runs."""
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise UserError(f"{path}: not a valid safetensors file: {exc}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for anything that is not plain tensors and containers
        raise UserError(f"{path}: refused to load: not a plain weights file "
                        f"({type(exc).__name__}: {str(exc).split('.')[0][:200]})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):  # Lightning-style
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: expected a state dict of tensors")
    return state


def load_checkpoint(path: Path, spec: ModelSpec) -> KDModel:
    """A user's weights file for architecture `spec.arch`, trained on raw (unscaled) features."""
    model = build(spec)  # identity scaling: the checkpoint's own preprocessing is inside its net
    state = read_state(path)
    target = model if any(k.startswith(("net.", "scale.")) for k in state) else model.net
    load_into(target, state, f"{path} does not match architecture {spec.arch!r} {spec.options}")
    return model.eval()


def load_into(module: nn.Module, state: dict[str, torch.Tensor], problem: str) -> None:
    """load_state_dict with a one-line account of what does not fit (keys or shapes)."""
    try:
        result = module.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln]
        raise UserError(f"{problem}: {lines[0] if lines else str(exc).splitlines()[0]}") from None
    if result.missing_keys or result.unexpected_keys:
        raise UserError(f"{problem}: missing {result.missing_keys[:3]} ({len(result.missing_keys)} in all), "
                        f"unexpected {result.unexpected_keys[:3]} ({len(result.unexpected_keys)} in all)")


def fingerprint(path: Path) -> str:
    """sha256 of weights + architecture config: the teacher part of the cache key."""
    h = hashlib.sha256()
    h.update(hashlib.sha256((path / WEIGHTS_FILE).read_bytes()).digest())
    meta = json.loads((path / META_FILE).read_text())
    h.update(json.dumps(meta, sort_keys=True).encode())
    return h.hexdigest()


def ensemble(members: list[tuple[KDModel, ModelSpec]], combine: str) -> tuple[KDModel, ModelSpec]:
    """One model from several loaded ones (same features and classes), weights copied in."""
    schema = members[0][1].schema
    spec = ModelSpec("ensemble", {"members": [{"arch": s.arch, "options": s.options} for _, s in members],
                                  "combine": combine}, schema)
    model = build(spec)
    for slot, (member, _) in zip(cast(Ensemble, model.net).members, members, strict=True):
        slot.load_state_dict(member.state_dict())
    return model.eval(), spec


@torch.inference_mode()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Logits for rows `x` on CPU in batches.  # (N, F) -> (N, K)"""
    model.eval()
    out = [model(torch.from_numpy(x[i:i + batch_size])).float().numpy()
           for i in range(0, len(x), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
