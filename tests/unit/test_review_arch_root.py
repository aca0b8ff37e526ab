"""A relative `student.arch` directory (a Hugging Face config) is the project's, read against the project
root the stage runs for, not against the working directory: `kd stage` from a subfolder, or a flow run with
`root=`, builds the student params.yaml names, and a same-named folder in the working directory is ignored."""

from pathlib import Path

import pytest

from kd_core import tasks
from kd_core.config import StudentParams, TeacherParams
from kd_core.data import Schema
from kd_core.errors import UserError
from kd_core.models import ModelSpec, arch_dir
from kd_core.tasks import _hf as hf
from kd_core.tasks.lm import models as lm_models
from kd_core.tasks.lm.data import LMInfo
from kd_core.tasks.text import data as text_data
from tests.lm.conftest import build_llama, train_tokenizer
from tests.text.conftest import build_encoder, corpus, student_config

ARCH = "configs/student"


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory: not the project, and holding a decoy folder of the same relative name."""
    cwd = tmp_path / "elsewhere"
    (cwd / ARCH).mkdir(parents=True)
    (cwd / ARCH / "config.json").write_text("{not a config")  # read it and the build fails
    monkeypatch.chdir(cwd)
    return cwd


def test_arch_dir_reads_relative_paths_from_the_root(tmp_path: Path) -> None:
    assert arch_dir(ARCH, tmp_path) == tmp_path / ARCH
    assert arch_dir(str(tmp_path / "abs"), Path("/other")) == tmp_path / "abs"
    assert arch_dir(ARCH, None) == Path(ARCH)  # no project: the caller's working directory


def test_text_student_config_dir_is_the_projects(tmp_path: Path, elsewhere: Path) -> None:
    root = tmp_path / "project"
    encoder = build_encoder(tmp_path / "encoder", corpus(200, seed=1)["text"].tolist(), layers=1)
    tokenizer = hf.load_tokenizer((encoder / "tokenizer.json").read_bytes(), encoder)
    student_config(root / ARCH, tokenizer.get_vocab_size())
    info = text_data.TextInfo(64, 0, 12, hf.file_sha256(encoder / "tokenizer.json"))
    schema = Schema(("text",), "label", ("a", "b"), info.to_json())
    task = tasks.get("text")
    spec = task.spec(StudentParams(arch=ARCH), schema, root)
    model = task.build(spec, None, 0, encoder)
    assert model.net.config.hidden_size == 16 and model.net.config.num_hidden_layers == 1
    assert "root" not in spec.to_json() and spec == ModelSpec(ARCH, {}, schema, "text")  # the root is never saved
    with pytest.raises(UserError, match="not a text student"):
        task.spec(StudentParams(arch="configs/missing"), schema, root)


def test_lm_student_config_dir_is_the_projects(tmp_path: Path, elsewhere: Path) -> None:
    root = tmp_path / "project"
    blob = train_tokenizer(vocab_size=300)
    source = build_llama(tmp_path / "teacher-src", blob, layers=2)
    build_llama(root / ARCH, blob, layers=1, seed=3)  # the student's config (and tokenizer) in the project
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_str(blob.decode()).get_vocab()
    info = LMInfo(seq_len=16, eos_id=vocab["<|endoftext|>"], vocab_size=len(vocab),
                  tokenizer_sha256=lm_models.tokenizer_sha256(blob), train_tokens=100, test_tokens=20)
    schema = Schema(("text",), "next_token", tuple(sorted(vocab, key=vocab.get)), info.to_json())
    task = tasks.get("lm")
    teacher = root / "artifacts/teacher"
    teacher.mkdir(parents=True)
    task.adopt(source, TeacherParams(source=str(source)), schema, teacher)
    model = task.build(task.spec(StudentParams(arch=ARCH), schema, root), None, 0, teacher)
    assert model.net.config.num_hidden_layers == 1
