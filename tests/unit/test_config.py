"""params.yaml: unknown keys and bad values are one-line errors naming the key."""

import shutil
from pathlib import Path

import pytest
import yaml

from kd_core.config import Params, load_params, parse_params, set_params
from kd_core.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


def test_project_params_load():
    p = load_params(ROOT)
    assert p.data.source == "mnist1d" and p.registry.model_name == "kd-student"


def test_code_defaults_match_params_yaml():
    """A key left out of someone's params.yaml must mean what the shipped params.yaml says.

    Only the architecture `options` differ: they are keyword arguments of the chosen factory, so
    their default is empty (the factory's own defaults), not the demo's CNN/MLP widths. And
    `distill.search`: off unless asked for (it multiplies the student's training time), on in
    every shipped example.
    """
    shipped = load_params(ROOT).model_dump(mode="json")
    defaults = Params().model_dump(mode="json")
    for section in ("teacher", "student"):
        shipped[section].pop("options")
        defaults[section].pop("options")
    assert defaults["distill"].pop("search") is None and shipped["distill"].pop("search")["candidates"]
    assert defaults == shipped


@pytest.mark.parametrize("raw,needle", [
    ({"distill": {"temprature": 2}}, "distill.temprature: unknown key"),
    ({"distill": {"temperature": 0}}, "distill.temperature"),
    ({"distill": {"alpha": 1.5}}, "distill.alpha"),
    ({"train": {"epochs": "many"}}, "train.epochs"),
    ({"cache": {"dtype": "int8"}}, "cache.dtype"),
    ({"data": {"source": "parquet"}}, "needs data.train and data.test"),
    ({"bogus": {}}, "bogus: unknown key"),
])
def test_bad_params_name_the_key(raw, needle):
    with pytest.raises(UserError) as err:
        parse_params(raw)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_set_params_keeps_comments_and_validates(tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    set_params(tmp_path, ["distill.temperature=2.5", "data.feature_columns=[a, b]"])
    text = (tmp_path / "params.yaml").read_text()
    assert "# softens the teacher" in text
    loaded = yaml.safe_load(text)
    assert loaded["distill"]["temperature"] == 2.5 and loaded["data"]["feature_columns"] == ["a", "b"]
    before = (tmp_path / "params.yaml").read_text()
    with pytest.raises(UserError, match="distill.alpha"):
        set_params(tmp_path, ["distill.alpha=7"])
    assert (tmp_path / "params.yaml").read_text() == before  # a rejected edit writes nothing


def test_params_digest_changes_with_values():
    assert parse_params({}).digest() != parse_params({"distill": {"temperature": 3}}).digest()


def test_every_example_params_file_loads_and_the_demo_is_the_shipped_params_yaml():
    """`examples/<name>/params.yaml` is copied over params.yaml to start from an example."""
    examples = sorted((ROOT / "examples").glob("*/params.yaml"))
    assert "mnist1d" in [p.parent.name for p in examples]
    for path in examples:
        load_params(path.parent)
    assert (ROOT / "examples/mnist1d/params.yaml").read_text() == (ROOT / "params.yaml").read_text()


def test_unknown_task_is_a_one_line_error():
    with pytest.raises(UserError, match=r"task 'speech': choose one of \['image', 'lm', 'tabular', 'text'\]"):
        parse_params({"task": "speech"})


def test_set_params_is_atomic_a_failed_write_leaves_params_yaml_as_it_was(tmp_path, monkeypatch):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    before = (tmp_path / "params.yaml").read_text()

    def crash(*_args):
        raise OSError("disk full")

    monkeypatch.setattr("kd_core.fs.os.replace", crash)
    with pytest.raises(OSError):
        set_params(tmp_path, ["distill.temperature=2"])
    assert (tmp_path / "params.yaml").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]  # no temporary file left behind


def test_a_params_file_without_task_names_the_key(tmp_path):
    """dvc.yaml's code deps read `task` from params.yaml: without it DVC could not even parse the DAG."""
    (tmp_path / "params.yaml").write_text("train: {epochs: 3}\n")
    with pytest.raises(UserError, match=r"no `task:` key; set it \(one of image, lm, tabular, text\)"):
        load_params(tmp_path)


def test_an_empty_params_file_and_a_set_that_drops_nothing_still_need_task(tmp_path):
    (tmp_path / "params.yaml").write_text("")
    with pytest.raises(UserError, match="no `task:` key"):
        load_params(tmp_path)
    (tmp_path / "params.yaml").write_text("train: {epochs: 3}\n")
    with pytest.raises(UserError, match=r"\(after --set\): no `task:` key"):
        set_params(tmp_path, ["train.epochs=4"])
    assert (tmp_path / "params.yaml").read_text() == "train: {epochs: 3}\n"  # nothing written


def test_a_source_of_one_other_task_names_it():
    with pytest.raises(UserError, match=r"task 'tabular' reads data.source mnist1d or parquet, not 'text' "
                                        r"\(task 'lm' reads it: set task: lm\)"):
        parse_params({"task": "tabular", "data": {"source": "text", "train": "a", "test": "b"}})
