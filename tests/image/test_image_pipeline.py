"""`task: image` end to end under `dvc repro`: the example params on the user's ImageFolder directories
(RGB and greyscale PNG/JPEG of several sizes), a view cache of 2 augmented views per image, through
register, export and report. One project, built once for the module; each test reads one output."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from kd_core import data, tasks
from kd_core.cache import LogitCache
from kd_core.tasks.image import data as image_data
from kd_core.tasks.image import models as image_models
from tests.conftest import ALL_STAGES, dvc, stages_ran
from tests.image.conftest import IMAGES, SHAPES, image_project

pytestmark = pytest.mark.slow
MODEL_KEYS = {"accuracy", "ece", "nll", "agreement_with_teacher", "params", "macs", "latency_ms_p50", "size_bytes"}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, shape_folders: Path) -> Iterator[tuple[Path, str]]:
    """The project after one `dvc repro`, and that repro's stdout."""
    with image_project(tmp_path_factory.mktemp("image-e2e"), shape_folders) as proj:
        res = dvc(proj, "repro")
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        yield proj, res.stdout


def read(proj: Path, rel: str) -> dict:
    return json.loads((proj / rel).read_text())


def test_repro_runs_the_whole_dag(run: tuple[Path, str]) -> None:
    assert stages_ran(run[1]) == ALL_STAGES


def test_prepared_images_are_resized_rgb_with_their_origin(run: tuple[Path, str]) -> None:
    proj, _ = run
    schema = read(proj, "data/prepared/schema.json")
    assert schema["classes"] == list(SHAPES) and schema["features"] == ["image"]
    info = schema["image"]
    assert info["size"] == 20 and info["channels"] == 3  # some images are RGB: every image read as RGB
    train = pd.read_parquet(proj / "data/prepared/train.parquet")
    assert len(train) == 180 and (train[image_data.PIXELS].map(len) == 3 * 20 * 20).all()
    assert set(train[image_data.BANDS]) == {1, 3} and train[image_data.WIDTH].between(18, 26).all()
    summary = read(proj, "reports/validation/summary.json")
    assert summary["success"] and summary["splits"]["train"]["rows"] == 180


def test_view_cache_replays_exactly_what_the_teacher_saw(run: tuple[Path, str]) -> None:
    """Rows = image × view; the student's inputs rendered from the stored views give the cached logits."""
    proj, _ = run
    manifest = read(proj, "artifacts/logits/manifest.json")
    assert manifest["rows"] == (180 + 150) * 2 and manifest["views"]["per_row"] == 2
    cache, task = LogitCache(proj / "artifacts/logits"), tasks.get("image")
    views = cache.views()
    assert views is not None and views.shape == (660, 5)
    assert (views[:, 2:4] > 0).all() and (views[:, 2:4] <= 1).all() and set(np.unique(views[:, 4])) <= {0.0, 1.0}
    splits = data.read_prepared(proj / "data/prepared")
    x = task.cache_inputs(splits, views)  # (330, 2, C, S, S): what the student trains on
    assert x.shape == (330, 2, 3, 20, 20) and x.dtype == np.uint8
    assert not (x[:, 0] == x[:, 1]).all()  # two different views of each image
    teacher, _ = image_models.load(proj / "artifacts/teacher")
    with torch.inference_mode():
        recomputed = teacher(torch.from_numpy(x)).reshape(-1, len(SHAPES)).numpy()  # (660, K)
    np.testing.assert_array_equal(recomputed, cache.take(np.arange(660)))


def test_eval_json_holds_every_model_metric(run: tuple[Path, str]) -> None:
    proj, _ = run
    ev = read(proj, "metrics/eval.json")
    for role in ("teacher", "student", "baseline"):
        assert set(ev[role]) >= MODEL_KEYS, (role, sorted(ev[role]))
    assert ev["teacher"]["accuracy"] > 0.8  # three drawn shapes: the teacher did learn them
    assert ev["student"]["macs"] < ev["teacher"]["macs"] and ev["student"]["params"] < ev["teacher"]["params"]


def test_export_matches_pytorch_in_fp32_and_int8(run: tuple[Path, str]) -> None:
    import onnxruntime as ort

    proj, _ = run
    student = read(proj, "metrics/export.json")["student"]
    assert student["onnx"]["max_abs_logit_diff"] < 1e-3 and student["onnx"]["agreement_with_pytorch"] == 1.0
    assert student["onnx_int8"]["agreement_with_pytorch"] > 0.8
    sess = ort.InferenceSession(str(proj / "artifacts/onnx/model.int8.onnx"), providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    assert inp.name == "pixels" and inp.type == "tensor(uint8)"
    (logits,) = sess.run(None, {inp.name: np.zeros((3, 3, 20, 20), np.uint8)})
    assert logits.shape == (3, len(SHAPES))


def _png64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def test_registered_model_answers_images_with_class_names(run: tuple[Path, str], shape_folders: Path) -> None:
    """Base64 PNG/JPEG of any size and mode, raw bytes and pixel arrays in; class names out."""
    proj, _ = run
    files = sorted((proj / IMAGES / "test").rglob("*.*"))
    truth = [f.parent.name for f in files]
    model = mlflow.pyfunc.load_model("models:/kd-student/1")
    preds = np.asarray(model.predict(pd.DataFrame({"image": [_png64(f) for f in files]})))
    assert set(preds) <= set(SHAPES) and np.mean(preds == np.asarray(truth)) > 0.6
    big = io.BytesIO()
    Image.open(files[0]).convert("RGBA").resize((97, 61)).save(big, format="PNG")
    arr = np.asarray(Image.open(files[1]).convert("RGB"))
    mixed = model.predict(pd.DataFrame({"image": [base64.b64encode(big.getvalue()).decode(), arr]}),
                          params={"output": "probabilities"})
    assert list(mixed.columns) == list(SHAPES)
    np.testing.assert_allclose(mixed.to_numpy().sum(axis=1), 1.0, atol=1e-5)


def test_model_card_shows_test_images_and_the_view_cache(run: tuple[Path, str]) -> None:
    proj, _ = run
    md = (proj / "reports/model_card.md").read_text()
    assert (proj / "reports/figures/test_images.png").stat().st_size > 10_000
    assert "figures/test_images.png" in md and "2 view(s) per image" in md and "bytes per row" in md
    assert "image (20×20 pixels)" in md


def test_second_repro_is_a_no_op(run: tuple[Path, str]) -> None:
    proj, _ = run
    res = dvc(proj, "repro")
    assert res.returncode == 0, res.stderr[-2000:]
    assert stages_ran(res.stdout) == set(), res.stdout[-2000:]
