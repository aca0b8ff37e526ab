"""Fixtures for `task: image`, made offline in seconds: three classes of shapes drawn with Pillow (a disc,
a square, horizontal stripes) at random places, sizes, colours and noise, written as an ImageFolder
tree (PNG and JPEG, RGB and greyscale, sizes 18-26 px) the way a user brings their own images.

A small CNN separates the shapes in a few epochs, which is what lets the pipeline test run on two cores.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.conftest import ROOT, git, new_project, write_params
from tests.reliability.conftest import Damage
from tests.text.conftest import project_env

SHAPES = ("disc", "square", "stripes")  # the class names (folder names), in kd's sorted order
IMAGES = "data/raw/images"  # a project's copy of the folders: inside paths.raw, as a user keeps them
# examples/image/params.yaml made small enough for 2 cores, with a policy that never decides a test's outcome
TINY_IMAGE = {
    "data": {"source": "folder", "train": f"{IMAGES}/train", "test": f"{IMAGES}/test",
             "transfer": f"{IMAGES}/transfer", "image_size": 20, "channels": None},
    "teacher": {"arch": "resnet", "options": {"width": 8, "blocks": [1, 1]}, "epochs": 20, "batch_size": 32,
                "lr": 0.01},
    "student": {"arch": "cnn", "options": {"width": 4}},
    "cache": {"views": 2, "batch_size": 64, "shard_rows": 256, "dtype": "float32"},
    "train": {"epochs": 3, "batch_size": 32, "lr": 0.01, "device": "cpu", "patience": None},
    "policy": {"min_teacher_retention": 0.0, "min_gain_over_baseline": -1.0, "max_latency_ratio": 100.0,
               "max_size_bytes": None, "max_class_drop": 1.0, "min_gain_over_champion": -1.0, "max_p_value": 1.0,
               "max_int8_accuracy_drop": None},
    "export": {"methods": ["minmax"], "calibration_rows": 64, "selection_rows": 64},
    "distill": {"search": None},
    "validation": {"max_small_frac": 1.0},
}


def shape_image(rng: np.random.Generator, shape: str, size: int, grey: bool) -> Image.Image:
    """One image of `shape`: a random colour on a random background, placed and sized at random, noisy."""
    bg, fg = rng.integers(0, 90, 3), rng.integers(150, 256, 3)
    im = Image.new("RGB", (size, size), tuple(int(v) for v in bg))
    draw = ImageDraw.Draw(im)
    r = int(rng.integers(size // 4, size // 2))
    cx, cy = (int(v) for v in rng.integers(r, size - r + 1, 2))
    colour = tuple(int(v) for v in fg)
    if shape == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        for y in range(int(rng.integers(0, 3)), size, 4):
            draw.rectangle([0, y, size, y + 1], fill=colour)
    noisy = np.asarray(im, np.int16) + rng.integers(-20, 21, (size, size, 3))
    im = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    return im.convert("L") if grey else im


def write_folder(root: Path, per_class: int, seed: int, labelled: bool = True) -> Path:
    """An ImageFolder tree (`root/<shape>/<i>.png|jpg`), or flat unlabelled images when not `labelled`."""
    rng = np.random.default_rng(seed)
    for shape in SHAPES:
        folder = root / shape if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            im = shape_image(rng, shape, int(rng.integers(18, 27)), grey=bool(rng.random() < 0.3))
            ext = "jpg" if i % 4 == 0 else "png"
            im.save(folder / f"{shape if not labelled else ''}{i:04d}.{ext}", quality=95)
    return root


@pytest.fixture(scope="session")
def shape_folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """train (60 per class), test (30 per class), transfer (150 unlabelled): written once per session."""
    root = tmp_path_factory.mktemp("shapes")
    write_folder(root / "train", 60, seed=1)
    write_folder(root / "test", 30, seed=2)
    write_folder(root / "transfer", 50, seed=3, labelled=False)
    return root


def kd_here(root: Path, *args: str) -> subprocess.CompletedProcess:
    """`kd ARGS` in `root` through the console entry point (kd_core.cli.main) in this process: the same
    exit code, stdout and stderr as tests.conftest.kd's subprocess, an escaped exception written as its
    traceback, without paying a fresh interpreter's imports (2-6 s of CPU a stage) each time. Its torch
    threads are the worker's, as many as a subprocess gets (tests/threads.py)."""
    from kd_core.cli import main

    out, err, code = io.StringIO(), io.StringIO(), 0
    argv = sys.argv
    sys.argv = ["kd", *args]
    try:
        with contextlib.chdir(root), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main()
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except Exception:  # what a subprocess would die of: its traceback on stderr, exit 1
                traceback.print_exc(file=err)
                code = 1
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(["kd", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture
def tally(record_property: Callable[[str, object], None]) -> Damage:
    """The reliability suite's damage record (tests/reliability/conftest.py), for the image cases."""
    return Damage(record_property)


@contextmanager
def image_project(tmp: Path, folders: Path, overrides: dict | None = None) -> Iterator[Path]:
    """A committed project with examples/image/params.yaml made tiny (TINY_IMAGE), the image folders under
    data/raw, its environment set and the cwd in it until the block ends (for module fixtures)."""
    import mlflow

    with pytest.MonkeyPatch.context() as mp:
        for var, value in project_env(tmp).items():
            mp.setenv(var, value)
        mp.delenv("MLFLOW_RUN_ID", raising=False)
        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])  # an earlier test may have set another store
        proj = new_project(tmp / "proj", {})
        shutil.copy2(ROOT / "examples/image/params.yaml", proj / "params.yaml")
        shutil.copytree(folders, proj / IMAGES)
        write_params(proj, TINY_IMAGE)
        if overrides:
            write_params(proj, overrides)
        git(proj, "init", "-q")
        git(proj, "add", "-A")
        git(proj, "commit", "-qm", "image project")
        mp.chdir(proj)
        yield proj
