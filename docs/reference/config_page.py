"""The configuration page: every key of `params.yaml`, one table per section (pydantic model), with
its type, default and explanation, generated from kd_core.config.Params."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from .comments import PARAMS_YAML, field_comments, yaml_comments
from .fields import constraints, default_of, is_list, is_mapping, models_in, type_name
from .markup import anchor, cell, escape


@dataclass
class Row:
    """One key of params.yaml: its dotted path, type, default and explanation."""

    key: str
    type: str
    default: str
    description: str
    mapping: bool = False


@dataclass
class Section:
    """One table of the configuration page: a model and the keys it holds."""

    key: str
    doc: str
    rows: list[Row] = field(default_factory=list)


def _model_doc(model: type[BaseModel]) -> str:
    """A model's own docstring (pydantic's inherited BaseModel docstring is not an explanation)."""
    doc = model.__dict__.get("__doc__") or ""
    return " ".join(doc.split())


def _plan(model: type[BaseModel], key: str, plan: dict[type[BaseModel], str]) -> None:
    """First pass: which dotted key documents which model. A model met again (`teachers` repeats
    `teacher`) links to the first table instead of repeating it."""
    plan.setdefault(model, key)
    for name, info in model.model_fields.items():
        for sub in models_in(info.annotation):
            if sub not in plan:
                child = f"{key}.{name}" if key else name
                _plan(sub, f"{child}[]" if is_list(info.annotation) else child, plan)


def _describe(info: FieldInfo, comment: str | None, from_yaml: str | None) -> str:
    """Field(description=...) first, then the code's comment, then the shipped params.yaml's, then
    (for a section) its model's docstring."""
    section_doc = next((_model_doc(m) for m in models_in(info.annotation)), "")
    return (info.description or comment or from_yaml or section_doc).strip()


def _rows(model: type[BaseModel], key: str, plan: dict[type[BaseModel], str],
          yaml_docs: dict[str, str]) -> list[Row]:
    """One row per field of `model`, whose dotted prefix is `key`."""
    comments = field_comments(model)
    rows = []
    for name, info in model.model_fields.items():
        dotted = f"{key}.{name}" if key else name
        kind = type_name(info.annotation, plan)
        if limits := constraints(info):
            kind = f"{kind} ({limits})"
        text = _describe(info, comments.get(name), yaml_docs.get(dotted.replace("[]", "")))
        rows.append(Row(dotted, kind, default_of(info), text, is_mapping(info.annotation)))
    return rows


def config_sections(root: type[BaseModel] | None = None, params_yaml: Path = PARAMS_YAML) -> list[Section]:
    """Every model reachable from `root` (kd_core.config.Params) as a table, in the order the keys
    appear in params.yaml: the top level first, then each section and its nested sections."""
    if root is None:
        from kd_core.config import Params

        root = Params
    plan: dict[type[BaseModel], str] = {}
    _plan(root, "", plan)
    yaml_docs = yaml_comments(params_yaml)
    return [Section(key, _model_doc(model) if key else "", _rows(model, key, plan, yaml_docs))
            for model, key in plan.items()]


def config_rows(root: type[BaseModel] | None = None, params_yaml: Path = PARAMS_YAML) -> list[Row]:
    """Every documented key, flat: what the test checks the shipped params files against."""
    return [row for section in config_sections(root, params_yaml) for row in section.rows]


def _section_markdown(section: Section) -> Iterator[str]:
    title = f"`{section.key}`" if section.key else "Top level"
    yield f"## {title} {{#{anchor(section.key)}}}"
    yield ""
    if section.doc:
        yield escape(section.doc)
        yield ""
    yield "| key | type | default | description |"
    yield "|---|---|---|---|"
    for row in section.rows:
        text = row.description
        if row.mapping:
            text = f"{text} (a free-form mapping: its keys are not checked here)".strip()
        yield f"| `{row.key}` | {cell(row.type)} | {cell(row.default)} | {cell(text)} |"
    yield ""


def config_markdown(root: type[BaseModel] | None = None, params_yaml: Path = PARAMS_YAML) -> str:
    """The configuration page: one table per section of params.yaml."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `kd_core/config.py` by `docs/gen_reference.py` on every docs build, so it lists",
        "exactly the keys the pipeline accepts; any other key is an error when params.yaml is loaded.",
        "Descriptions are the code's comments on each field, or else the comment in the shipped",
        "`params.yaml` (the tabular demo). A key left out of params.yaml takes the default shown here;",
        "the examples' `examples/<name>/params.yaml` set most of them explicitly.",
        "`name[]` stands for each item of the list `name`.",
        "",
    ]
    for section in config_sections(root, params_yaml):
        lines.extend(_section_markdown(section))
    return "\n".join(lines)
