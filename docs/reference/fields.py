"""How a field's type, default and value checks are written on the configuration page: as a YAML
user reads them (`null`, `a | b`, `list of …`, `≥ 0`), not as Python spells them."""

from __future__ import annotations

import re
import types
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from .markup import anchor


def models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside a type (`X | None`, `tuple[X, ...]`, `dict[str, X]`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in models_in(arg)]


def is_list(annotation: Any) -> bool:
    """Whether values of this type are written as a YAML list (tuple or list, possibly optional)."""
    if get_origin(annotation) in (list, tuple, set, frozenset):
        return True
    return _is_union(annotation) and any(is_list(a) for a in get_args(annotation))


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType)


def is_mapping(annotation: Any) -> bool:
    """A free-form mapping (e.g. `teacher.options`): its keys are not fields, so no row lists them."""
    if get_origin(annotation) is dict:
        return True
    return _is_union(annotation) and any(is_mapping(a) for a in get_args(annotation))


def type_name(annotation: Any, sections: dict[type[BaseModel], str]) -> str:
    """A type as a YAML user reads it: `null` for None, `a | b` for Literal choices and unions,
    `list of …` for tuples and lists, `mapping` for dicts, `section` (linked) for nested models."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(yaml_value(a) for a in args)
    if _is_union(annotation):
        return " | ".join(type_name(a, sections) for a in args)
    if origin in (list, tuple, set, frozenset):
        items = [a for a in args if a is not Ellipsis]
        inner = " | ".join(dict.fromkeys(type_name(a, sections) for a in items)) or "any"
        return f"list of {inner}"
    if origin is dict:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        key = sections.get(annotation)
        return f"[section](#{anchor(key)})" if key else "section"
    if annotation is Any:
        return "any"
    return getattr(annotation, "__name__", str(annotation))


_BOUNDS = {annotated_types.Ge: ("≥", "ge"), annotated_types.Gt: (">", "gt"),
           annotated_types.Le: ("≤", "le"), annotated_types.Lt: ("<", "lt")}


def constraints(info: FieldInfo) -> str:
    """The value checks pydantic applies (`ge=0` as `≥ 0`, min_length), so the page says what is legal."""
    parts = []
    for meta in info.metadata:
        for kind, (sign, attr) in _BOUNDS.items():
            if isinstance(meta, kind):
                parts.append(f"{sign} {yaml_value(getattr(meta, attr))}")
        if isinstance(meta, annotated_types.MinLen):
            parts.append(f"length ≥ {meta.min_length}")
        if isinstance(meta, annotated_types.MaxLen):
            parts.append(f"length ≤ {meta.max_length}")
    return ", ".join(parts)


def yaml_value(value: Any) -> str:
    """A Python value as it is written in params.yaml (`null`, `true`, `[a, b]`, `{k: v}`)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, BaseModel):
        return yaml_value(value.model_dump(mode="json"))
    if isinstance(value, list | tuple | set | frozenset):
        return "[" + ", ".join(yaml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {yaml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, str):
        return value if re.fullmatch(r"[\w./:@+-]+", value) else f'"{value}"'
    return repr(value)


def default_of(info: FieldInfo) -> str:
    """The default a missing key takes; `required` when there is none, `—` for a nested section."""
    if info.is_required():
        return "required"
    value = info.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "—"
    return f"`{yaml_value(value)}`"
