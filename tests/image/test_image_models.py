"""The image classifier and its directory: raw pixels in, rows of views batched, saved under the network's own
names and loaded back to the same logits; timm's layout where timm imports; what a served model accepts."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from kd_core import tasks
from kd_core.data import Schema
from kd_core.errors import UserError
from kd_core.models import ModelSpec
from kd_core.tasks.image import models, nets

SCHEMA = Schema(("image",), "label", ("cat", "dog", "owl"),
                image={"size": 16, "channels": 3, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]})
TASK = tasks.get("image")


def _model(arch: str = "resnet", options: dict | None = None) -> tuple[models.ImageClassifier, ModelSpec]:
    spec = ModelSpec(arch, options if options is not None else {"width": 8, "blocks": [1, 1]}, SCHEMA, "image")
    return models.build(spec, seed=0).eval(), spec


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 3, 16, 16), dtype=np.uint8)


def test_pixels_in_logits_out_and_views_batch_as_rows() -> None:
    model, _ = _model()
    x = _pixels(4)
    with torch.inference_mode():
        flat = model(torch.from_numpy(x))  # (4, K)
        rows = model(torch.from_numpy(x.reshape(2, 2, 3, 16, 16)))  # (2, 2, K): two rows of two views
    assert flat.shape == (4, 3) and rows.shape == (2, 2, 3)
    torch.testing.assert_close(rows.reshape(4, 3), flat)
    np.testing.assert_allclose(TASK.predict_logits(model, x.reshape(2, 2, 3, 16, 16)), flat.numpy(), rtol=1e-5)


def test_saved_directory_holds_the_network_s_own_names_and_loads_the_same_model(tmp_path: Path) -> None:
    model, spec = _model()
    models.save(model, spec, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert names == set(model.net.state_dict()) and not any(n.startswith("net.") for n in names)
    loaded, got = TASK.load(tmp_path)
    assert got == spec
    x = torch.from_numpy(_pixels(3))
    with torch.inference_mode():
        torch.testing.assert_close(loaded(x), model(x))
    assert TASK.fingerprint(tmp_path) == TASK.fingerprint(tmp_path)


def test_a_weights_file_becomes_a_teacher_and_a_wrong_one_is_one_line(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from kd_core.config import TeacherParams

    model, _ = _model()
    save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, str(tmp_path / "w.safetensors"))
    section = TeacherParams(arch="resnet", options={"width": 8, "blocks": [1, 1]})
    (tmp_path / "out").mkdir()
    adopted = TASK.adopt(tmp_path / "w.safetensors", section, SCHEMA, tmp_path / "out")
    x = torch.from_numpy(_pixels(2))
    with torch.inference_mode():
        torch.testing.assert_close(adopted.eval()(x), model(x))
    wrong = TeacherParams(arch="resnet", options={"width": 16, "blocks": [1, 1]})
    with pytest.raises(UserError, match="does not match architecture 'resnet'"):
        TASK.adopt(tmp_path / "w.safetensors", wrong, SCHEMA, tmp_path / "out")


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_served_model_reads_base64_bytes_and_arrays_of_any_size() -> None:
    model, spec = _model()
    rgb = np.random.default_rng(1).integers(0, 256, (30, 20, 3), dtype=np.uint8)
    grey = rgb[:, :, 0]
    frame = pd.DataFrame({"image": [base64.b64encode(_png(rgb)).decode(), _png(grey), rgb, grey,
                                    rgb.transpose(2, 0, 1)]})
    x = TASK.serving_inputs(model, spec, frame)
    assert x.shape == (5, 3, 16, 16) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[0], x[2])  # base64 PNG and the array decode alike
    np.testing.assert_array_equal(x[2], x[4])  # (H, W, C) and (C, H, W)
    answer = TASK.answer(model, spec, frame, {})
    assert set(answer) <= {"cat", "dog", "owl"} and len(answer) == 5


@pytest.mark.parametrize(("value", "needle"), [("not base64!", "not base64"), (3.5, "a float, not an image"),
                                               (b"\x00\x01", "not a readable image"),
                                               (np.zeros((2, 2, 2, 2)), "not an image")])
def test_served_model_refuses_what_is_not_an_image_in_one_line(value: object, needle: str) -> None:
    model, spec = _model()
    with pytest.raises(UserError, match=needle):
        TASK.serving_inputs(model, spec, pd.DataFrame({"image": [value]}))
    with pytest.raises(UserError, match="lacks the image column 'image'"):
        TASK.serving_inputs(model, spec, pd.DataFrame({"picture": [value]}))


@pytest.mark.skipif(nets.timm_available() is not None, reason=f"timm does not import: {nets.timm_available()}")
def test_a_timm_student_directory_loads_in_timm_and_adopts_back(tmp_path: Path) -> None:  # pragma: no cover
    import timm

    model, spec = _model("timm:resnet10t", {})
    models.save(model, spec, tmp_path / "kd")
    net = timm.create_model(f"local-dir:{tmp_path / 'kd'}", pretrained=True).eval()
    x = torch.from_numpy(_pixels(2)).float()
    with torch.inference_mode():
        torch.testing.assert_close(net((x - model.mean) / model.std), model(x))
    (tmp_path / "kd" / "model.json").unlink()  # a plain timm directory now
    (tmp_path / "out").mkdir()
    adopted = models.adopt_timm_dir(tmp_path / "kd", SCHEMA, "image", tmp_path / "out")
    with torch.inference_mode():
        torch.testing.assert_close(adopted.eval()(x), model(x))
