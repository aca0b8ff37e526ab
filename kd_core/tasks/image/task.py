"""`task: image` — a row is an image: its pixels, resized to `data.image_size` square with the data's channel
count; models are convolutional classifiers (kd_core.tasks.image.nets, or any timm model) behind the
normalisation of the training pixels (kd_core.tasks.image.models). With `cache.views`, each cached row is
an augmented view of an image, replayed exactly by the student (kd_core.tasks.image.views)."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path
from typing import cast

import numpy as np
import pandas as pd
import torch
from torch import nn

from kd_core import data
from kd_core import models as kd_models
from kd_core.config import Params, StudentParams, TeacherParams, ValidationParams
from kd_core.data import Schema, Splits
from kd_core.errors import UserError
from kd_core.models import CHECKPOINT_SUFFIXES, META_FILE, WEIGHTS_FILE, ModelSpec
from kd_core.tasks.base import Classifier, classify, labelled_then_transfer
from kd_core.tasks.image import data as image_data
from kd_core.tasks.image import models
from kd_core.tasks.image import views as view_cache
from kd_core.tasks.image.models import ImageClassifier


class ImageTask(Classifier):
    name = "image"
    builtin_sources: tuple[str, ...] = ("fashion_mnist",)  # Fashion-MNIST from the Debian package
    file_sources: tuple[str, ...] = ("folder", "parquet")  # ImageFolder directories, tables of encoded images
    requirements: tuple[str, ...] = ("pillow",)  # a served model decodes PNG/JPEG
    input_name = "pixels"  # the ONNX input: (B, C, S, S) uint8 pixels
    dynamic_axes: tuple[int, ...] = (0,)
    views = True

    def check_params(self, params: Params) -> None:
        if params.teachers:
            raise ValueError("teachers: an ensemble of image teachers is not supported; use the teacher section")

    def prepare(self, params: Params, root: Path, out: Path) -> Splits:
        splits = image_data.load_source(params.data, root)
        data.write_prepared(splits, out)
        return splits

    def split_expectations(self, name: str, splits: Splits, params: ValidationParams) -> list:
        from kd_core.tasks.image.checks import image_expectations  # Great Expectations: validate alone pays

        return image_expectations(name, splits, params)

    def write_card(self, params: Params, workdir: Path, out: Path, data_docs: str) -> dict[str, Path]:
        """The classifier card, with a grid of test images and the view cache's size."""
        from kd_core.card.content import write_card
        from kd_core.card.gather import classifier_inputs
        from kd_core.tasks.image.card import extra_blocks

        inp = classifier_inputs(params, workdir)
        return write_card(inp, out, data_docs, extra_blocks(params, workdir, inp))

    def describe(self, schema: Schema) -> str:
        info = schema.image_info
        kind = "a greyscale" if info["channels"] == 1 else "an RGB"
        return f"{kind} image ({info['size']}×{info['size']} pixels)"

    def inputs(self, frame: pd.DataFrame, schema: Schema) -> np.ndarray:
        return image_data.to_array(frame, schema.image_info)  # (N, C, S, S) uint8

    def labels(self, frame: pd.DataFrame, schema: Schema) -> np.ndarray:
        return data.label_indices(frame, schema)  # (N,)

    def cache_inputs(self, splits: Splits, views: np.ndarray | None = None) -> np.ndarray:
        """The images; with stored views, each image's views rendered.  # (N, C, S, S) or (N, V, C, S, S)"""
        x = labelled_then_transfer(self, splits)
        return x if views is None else view_cache.render(x, views)

    def draw_views(self, n_rows: int, views: int, augment: dict) -> np.ndarray:
        return view_cache.draw(n_rows, views, augment)  # (N·V, 5)

    def for_training(self, model: nn.Module, params: Params) -> nn.Module:
        """The teacher and the twin see the view cache's recipe online, a fresh view each step, so the
        teacher's soft labels for crops come from a teacher that has seen crops."""
        cast(ImageClassifier, model).augment = (params.cache.augment.model_dump(mode="json")
                                                if params.cache.augment.online else None)
        return model

    def spec(self, section: TeacherParams | StudentParams, schema: Schema, root: Path | None = None) -> ModelSpec:
        return ModelSpec(section.arch, dict(section.options), schema, self.name, root)

    def init_dir(self, params: Params, root: Path) -> Path | None:
        return None

    def build(self, spec: ModelSpec, x_train: np.ndarray | None, seed: int | None,
              init: Path | None = None) -> ImageClassifier:
        return models.build(spec, seed)

    def teacher_source(self, source: str, root: Path) -> Path:
        return root / source

    def adopt(self, src: Path, section: TeacherParams, schema: Schema, out: Path) -> ImageClassifier:
        """A kd image model directory, a timm model directory (config.json + model.safetensors, as timm's
        `save_pretrained`/`push_to_hf_hub` write it), or a weights file (safetensors; .pt/.pth read
        weights-only) of `teacher.arch` trained on these classes at this image size."""
        if src.is_dir() and not (src / META_FILE).is_file() and (src / models.CONFIG_FILE).is_file():
            return models.adopt_timm_dir(src, schema, self.name, out)  # timm's own save_pretrained layout
        if src.is_dir():
            model, spec = models.load(src)
            _check_fits(spec, schema, str(src))
            for file in (WEIGHTS_FILE, META_FILE, models.CONFIG_FILE):
                if (src / file).is_file():
                    shutil.copy2(src / file, out / file)
            return model
        if src.suffix not in CHECKPOINT_SUFFIXES:
            raise UserError(f"teacher {src}: expected a kd model directory or a weights file "
                            f"({', '.join(CHECKPOINT_SUFFIXES)})")
        spec = self.spec(section, schema)
        model = models.build(spec, None)
        models.load_weights(model, src, section.arch)
        models.save(model.eval(), spec, out)
        return model

    def save(self, model: nn.Module, spec: ModelSpec, out: Path) -> None:
        models.save(cast(ImageClassifier, model), spec, out)

    def load(self, path: Path) -> tuple[ImageClassifier, ModelSpec]:
        return models.load(path)

    def fingerprint(self, path: Path) -> str:
        return kd_models.fingerprint(path)

    def lengths(self, x: np.ndarray, schema: Schema) -> np.ndarray | None:
        return None

    def batch_order(self, model: nn.Module, x: np.ndarray) -> np.ndarray:
        return np.arange(len(x))  # images of one size: any order costs the same

    def positions(self, x: np.ndarray) -> int:
        return x.shape[1] if x.ndim == 5 else 1  # rows of V views: V cache rows each

    def cache_batch(self, model: nn.Module, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(rows))

    def cache_logits(self, model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        logits = model(batch)  # (B, K) or (B, V, K)
        return logits.reshape(-1, logits.shape[-1])  # (B·V, K): view v of image i is cache row i·V + v

    def predict_logits(self, model: nn.Module, x: np.ndarray) -> np.ndarray:
        return models.predict_logits(model, x)

    def serving_inputs(self, model: nn.Module, spec: ModelSpec, frame: pd.DataFrame) -> np.ndarray:
        """Images in the model's image column: encoded bytes (PNG, JPEG, ...), the same base64-encoded, or
        pixel arrays (H, W), (H, W, C) or (C, H, W); decoded and resized as the training images were."""
        col, info = spec.schema.features[0], spec.schema.image_info
        if col not in frame.columns:
            raise UserError(f"input lacks the image column {col!r} (columns: {list(frame.columns)[:8]})")
        out = np.empty((len(frame), info["channels"], info["size"], info["size"]), np.uint8)
        for i, value in enumerate(frame[col].tolist()):
            out[i] = image_data.decode(_encoded(value, f"input row {i}"), info["size"], info["channels"],
                                       f"input row {i} of column {col!r}")[0]
        return out  # (N, C, S, S)

    def answer(self, model: nn.Module, spec: ModelSpec, frame: pd.DataFrame, params: dict) -> np.ndarray | pd.DataFrame:
        return classify(self, model, spec, frame, params)

    def input_example(self, model: nn.Module, frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
        return self.client_inputs(frame.head(5), schema)

    def client_inputs(self, frame: pd.DataFrame, schema: Schema) -> pd.DataFrame:
        """Images as a JSON client sends them: base64-encoded PNG text in the image column (the prepared
        pixels, lossless, so a served model reads exactly what evaluate scored)."""
        pixels = image_data.to_array(frame, schema.image_info)  # (n, C, S, S)
        return pd.DataFrame({schema.features[0]: [png_base64(p) for p in pixels]}, index=frame.index)

    def example(self, spec: ModelSpec, batch: int = 1) -> torch.Tensor:
        info = spec.schema.image_info
        return torch.zeros(batch, info["channels"], info["size"], info["size"], dtype=torch.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    """One image (C, H, W) uint8 as a PNG file's bytes."""
    from PIL import Image

    arr = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="PNG")
    return buf.getvalue()


def png_base64(pixels: np.ndarray) -> str:
    """One image (C, H, W) uint8 as base64 PNG text: what a JSON client sends."""
    return base64.b64encode(png_bytes(pixels)).decode("ascii")


def _encoded(value: object, where: str) -> bytes:
    """A served value as encoded image bytes: bytes as they are, text as base64, an array as a PNG."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except ValueError:
            raise UserError(f"{where}: text that is not base64 (send an image's bytes base64-encoded)") from None
    if isinstance(value, np.ndarray | list):
        arr = np.asarray(value)
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):
            arr = arr.transpose(1, 2, 0)  # (C, H, W) -> (H, W, C)
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[:, :, 0]
        if arr.ndim not in (2, 3) or not np.isfinite(arr).all():
            raise UserError(f"{where}: an array of shape {arr.shape}, not an image (H, W), (H, W, C) or (C, H, W)")
        pixels = np.clip(arr, 0, 255).astype(np.uint8)
        return png_bytes(pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1))
    raise UserError(f"{where}: a {type(value).__name__}, not an image (bytes, base64 text or a pixel array)")


def _check_fits(spec: ModelSpec, schema: Schema, source: str) -> None:
    """A given teacher must predict the data's classes from images of the data's size and channels."""
    if tuple(map(str, spec.schema.classes)) != tuple(map(str, schema.classes)):
        raise UserError(f"teacher {source} predicts classes {list(spec.schema.classes)}, "
                        f"the training labels are {list(schema.classes)}")
    have, want = spec.schema.image_info, schema.image_info
    if (have["size"], have["channels"]) != (want["size"], want["channels"]):
        raise UserError(f"teacher {source} reads {have['channels']}-channel {have['size']}px images, the data is "
                        f"{want['channels']}-channel {want['size']}px: set data.image_size and data.channels to match")
