"""Bad image input against an image project whose teacher and view cache are already built. Every case
must: exit != 0 with exactly one `kd: error:` line naming the problem (the file, the folder, the count),
no traceback, no model version registered, no earlier artifact changed. Data problems must stop the DAG
before the teacher trains: each runs `kd stage` for prepare, validate and teacher in order and must fail
before the teacher. A student architecture that cannot be built is refused when train_student builds it.

One case per refusing stage (prepare, validate, train_student) runs `kd` as a subprocess, as dvc.yaml does;
the others, and the stages that build the project, run the same entry point (kd_core.cli.main) in this
process (kd_here, tests/image/conftest.py): the same exit code, stderr and artifacts, without a fresh
interpreter's imports (2-6 s of CPU) per stage.

Counted in the suite's reliability figure (`bad_input` marker, tests/tally.py).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from PIL import Image

from kd_core.tasks.image import nets
from tests.conftest import kd
from tests.image.conftest import IMAGES, image_project, kd_here
from tests.reliability.conftest import Damage, check_refused

pytestmark = pytest.mark.slow
UP_TO_TEACHER = ("prepare", "validate", "teacher")  # the case must fail before the last one
STUDENT = ("train_student",)
UPSTREAM = ["data/prepared", "reports/validation"]  # a case's prepare/validate rewrites them: restored after
GUARDED = ["artifacts/teacher", "artifacts/logits"]  # must come through every case byte for byte


@dataclass
class Prepared:
    """The project after prepare, validate, teacher and cache_logits, with its good params and images."""

    root: Path
    params: str
    images: Path  # the good folders

    def set_params(self, change: Callable[[dict], None]) -> None:
        raw = yaml.safe_load(self.params)
        change(raw)
        (self.root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    def restore(self) -> None:
        (self.root / "params.yaml").write_text(self.params)
        shutil.rmtree(self.root / IMAGES)
        shutil.copytree(self.images, self.root / IMAGES)
        for rel in UPSTREAM:
            shutil.rmtree(self.root / rel, ignore_errors=True)
            shutil.copytree(self.root.parent / "good" / rel, self.root / rel)

    def versions(self) -> int:
        return len(MlflowClient().search_model_versions("name='kd-student'"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, shape_folders: Path) -> Iterator[Prepared]:
    tmp = tmp_path_factory.mktemp("image-bad-input")
    with image_project(tmp, shape_folders, {"teacher": {"epochs": 2}}) as root:
        for stage in ("prepare", "validate", "teacher", "cache_logits"):
            res = kd_here(root, "stage", stage)
            assert res.returncode == 0, f"{stage}: {res.stderr[-3000:]}"
        for rel in UPSTREAM:
            shutil.copytree(root / rel, tmp / "good" / rel)
        yield Prepared(root, (root / "params.yaml").read_text(), shape_folders)


# --- the cases ------------------------------------------------------------------------------------

def _write(rel: str, content: bytes) -> Callable[[Prepared], None]:
    def apply(p: Prepared) -> None:
        (p.root / IMAGES / rel).parent.mkdir(parents=True, exist_ok=True)
        (p.root / IMAGES / rel).write_bytes(content)
    return apply


def _truncated_png(p: Prepared) -> None:
    good = next((p.root / IMAGES / "train/disc").glob("*.png"))
    (p.root / IMAGES / "train/disc/cut.png").write_bytes(good.read_bytes()[:60])


def _tiny_images(p: Prepared) -> None:
    """A fifth of the square class replaced by 1×1 images: more than validation.max_small_frac allows."""
    p.set_params(lambda raw: raw["validation"].update(max_small_frac=0.1))
    for i, f in enumerate(sorted((p.root / IMAGES / "train/square").glob("*.png"))[:40]):
        Image.new("RGB", (1, 1), (200, 5 * i, 10)).save(f)  # each its own colour: not duplicates


def _empty_class(p: Prepared) -> None:
    (p.root / IMAGES / "train/blank").mkdir()


def _unknown_test_class(p: Prepared) -> None:
    shutil.copytree(p.root / IMAGES / "test/disc", p.root / IMAGES / "test/ellipse")


def _duplicates(p: Prepared) -> None:
    """The same picture under 30 names: a broken export that copied one file."""
    src = next((p.root / IMAGES / "train/disc").glob("*.png"))
    for i in range(30):
        shutil.copy2(src, p.root / IMAGES / f"train/disc/copy{i}.png")


def _student(arch: str) -> Callable[[Prepared], None]:
    return lambda p: p.set_params(lambda raw: raw.update(student={"arch": arch, "options": {}}))


CASES: dict[str, tuple[Callable[[Prepared], None], list[str], tuple[str, ...]]] = {
    # case: (break it, words the error line must hold, stages to run in order)
    "image: corrupt file": (_write("train/square/broken.png", b"\x89PNG\r\n\x1a\nnot really"),
                            ["broken.png", "not a readable image"], UP_TO_TEACHER),
    "image: truncated PNG": (_truncated_png, ["cut.png", "not a readable image"], UP_TO_TEACHER),
    "image: zero-byte file": (_write("train/stripes/empty.jpg", b""), ["empty.jpg"], UP_TO_TEACHER),
    "image: text file with an image extension": (_write("test/disc/notes.png", b"shopping list\n"),
                                                 ["notes.png", "not a readable image"], UP_TO_TEACHER),
    "image: not an image extension": (_write("train/disc/labels.csv", b"a,b\n1,2\n"),
                                      ["labels.csv"], UP_TO_TEACHER),
    "image: 1x1 images beyond max_small_frac": (_tiny_images, ["of 180 images", "image_size=20 px", "max_small_frac"],
                                                UP_TO_TEACHER),
    "image: label folder with no images": (_empty_class, ["blank"], UP_TO_TEACHER),
    "image: test class unknown to train": (_unknown_test_class, ["ellipse"], UP_TO_TEACHER),
    "image: duplicated images": (_duplicates, ["repeat another one", "max_duplicate_frac"], UP_TO_TEACHER),
    "image: unknown student architecture": (_student("vgg99"), ["vgg99", "mobilenet"], STUDENT),
}
if nets.timm_available() is not None:  # where timm imports, timm:<name> builds: no error to check
    CASES["image: timm student without timm"] = (_student("timm:resnet18"), ["timm", "torchvision"], STUDENT)
# run as `kd` subprocesses: one case refused in each of prepare, validate and train_student
SUBPROCESS = {"image: corrupt file", "image: duplicated images", "image: unknown student architecture"}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", list(CASES))
def test_bad_image_input_is_one_line_before_compute(prepared: Prepared, case: str, tally: Damage,
                                                   record_property: Callable[[str, object], None]) -> None:
    break_it, needles, stages = CASES[case]
    check_refused(prepared, break_it, needles, stages, GUARDED, tally, record_property,
                  kd if case in SUBPROCESS else kd_here)
