"""The docs' reference pages, generated from the code so they cannot drift from it.

`cli.md` comes from the typer app (every registered command, its usage, arguments and options) and
`configuration.md` from the pydantic params models (every key of `params.yaml`, its type, default and
explanation). mkdocs-gen-files runs this file on every `mkdocs build` (mkdocs.yml); the functions are
pure and generic over the app and the models, so fields and commands added later appear on their own
and tests/unit/test_docs.py can call them without mkdocs. `python docs/gen_reference.py DIR` writes
both pages into DIR, to read them without building the site.
"""

from __future__ import annotations

import ast
import inspect
import io
import re
import sys
import tokenize
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

ROOT = Path(__file__).resolve().parent.parent
PARAMS_YAML = ROOT / "params.yaml"

# ---------------------------------------------------------------- comments in the sources


@dataclass
class _Comment:
    """One `#` comment of a source file: its text and whether code stands before it on its line."""

    line: int
    text: str
    trailing: bool


def _comments(source: str) -> dict[int, _Comment]:
    """Every comment by line, from `tokenize` (not a regex), so a `#` inside a string is never one."""
    found: dict[int, _Comment] = {}
    code_lines: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENCODING}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            line = tok.start[0]
            found[line] = _Comment(line, tok.string.lstrip("#").strip(), line in code_lines)
        elif tok.type not in skip:
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    return found


@dataclass
class _FieldSpan:
    """Where a class-level field assignment sits: its name and first and last line."""

    name: str
    first: int
    last: int


def _field_spans(cls: ast.ClassDef) -> list[_FieldSpan]:
    """The annotated assignments of a class body, in order (pydantic fields are exactly these)."""
    return [_FieldSpan(s.target.id, s.lineno, s.end_lineno or s.lineno) for s in cls.body
            if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)]


def _class_comments(cls: ast.ClassDef, comments: dict[int, _Comment]) -> dict[str, str]:
    """Field name -> its comment: the trailing comment on the field's own lines, and the comment lines
    between it and the next field. Those lines continue this field's comment when the next field has a
    trailing comment of its own (a wrapped sentence), else they introduce the next field."""
    spans = _field_spans(cls)
    own = {s.name: [c.text for ln in range(s.first, s.last + 1) if (c := comments.get(ln)) and c.trailing]
           for s in spans}
    text = {s.name: list(own[s.name]) for s in spans}
    previous_end = cls.lineno
    for i, span in enumerate(spans):
        above = _comment_block(comments, previous_end, span.first)
        earlier = spans[i - 1].name if i else None
        if above and earlier and own[earlier] and own[span.name]:
            text[earlier].extend(above)
        elif above:
            text[span.name][:0] = above
        previous_end = span.last
    return {name: " ".join(parts) for name, parts in text.items() if parts}


def _comment_block(comments: dict[int, _Comment], after: int, before: int) -> list[str]:
    """The whole-line comments directly above line `before` (no blank or code line between), oldest first."""
    block: list[str] = []
    line = before - 1
    while line > after and (c := comments.get(line)) and not c.trailing:
        block.insert(0, c.text)
        line -= 1
    return block


@cache
def _module_comments(path: str) -> dict[tuple[str, str], str]:
    """(class name, field name) -> comment for every class of one source file, read once per build."""
    source = Path(path).read_text()
    comments = _comments(source)
    found: dict[tuple[str, str], str] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            found.update({(node.name, k): v for k, v in _class_comments(node, comments).items()})
    return found


def field_comments(model: type[BaseModel]) -> dict[str, str]:
    """A model's field comments, wherever the model is defined: most fields of kd_core/config.py are
    explained by a `# comment` rather than `Field(description=...)`, and the docs should say the same."""
    path = inspect.getsourcefile(model)
    if path is None:
        return {}
    everything = _module_comments(path)
    return {f: everything[(model.__name__, f)] for f in model.model_fields if (model.__name__, f) in everything}


_YAML_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w.-]*):(?P<rest>.*)$")


def _split_comment(rest: str) -> str | None:
    """The comment after a YAML value, if any: a `#` after whitespace and outside quotes."""
    quote = None
    for i, ch in enumerate(rest):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1].isspace()):
            return rest[i + 1:].strip()
    return None


def _prose(block: list[str]) -> list[str]:
    """The prose of a comment block above a key: indented lines (a YAML example inside the comment)
    and a dangling `Example:` are left out, since the page shows one line per key."""
    lines = [text.strip() for text in block if not text.startswith("  ")]
    if lines:
        lines[-1] = re.sub(r"\s*(For example|Example|e\.g\.):$", "", lines[-1])
    return [line for line in lines if line]


def _push(stack: list[tuple[int, str]], indent: int, key: str) -> str:
    """Track the enclosing keys by indentation; return the dotted path of `key`."""
    stack[:] = [(i, k) for i, k in stack if i < indent] + [(indent, key)]
    return ".".join(k for _, k in stack)


def yaml_comments(path: Path = PARAMS_YAML) -> dict[str, str]:
    """Dotted key -> comment in a commented params file. The shipped params.yaml explains every value
    (a rule of the project), so it is the fallback for fields whose code carries no comment. Comment
    lines indented under a commented key continue its comment; a key without a comment of its own
    takes the comment block directly above it (`teachers:`)."""
    found: dict[str, list[str]] = {}
    stack: list[tuple[int, str]] = []
    last: str | None = None  # the key an indented comment line would continue
    block: list[str] = []  # whole-line comments since the last key, blank line or list item
    for line in path.read_text().splitlines() if path.exists() else []:
        stripped = line.strip()
        if stripped.startswith("#"):
            if last and found.get(last) and line.startswith(" "):
                found[last].append(stripped[1:].strip())
            else:
                last = None
                block.append(stripped[1:])
            continue
        m = _YAML_KEY.match(line)
        if not m:  # a blank line or a list item ends every comment
            last, block = None, []
            continue
        last = _push(stack, len(m["indent"]), m["key"])
        comment = _split_comment(m["rest"])
        found[last] = [comment] if comment else _prose(block)
        block = []
    return {k: " ".join(v) for k, v in found.items() if v}


# ---------------------------------------------------------------- types, defaults, constraints


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside a type (`X | None`, `tuple[X, ...]`, `dict[str, X]`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _is_list(annotation: Any) -> bool:
    """Whether values of this type are written as a YAML list (tuple or list, possibly optional)."""
    if get_origin(annotation) in (list, tuple, set, frozenset):
        return True
    return _is_union(annotation) and any(_is_list(a) for a in get_args(annotation))


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


# ---------------------------------------------------------------- configuration rows


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


def anchor(key: str | None) -> str:
    """A section's HTML id (set explicitly with attr_list, so links never depend on slugify rules)."""
    return "top" if not key else re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-")


def _model_doc(model: type[BaseModel]) -> str:
    """A model's own docstring (pydantic's inherited BaseModel docstring is not an explanation)."""
    doc = model.__dict__.get("__doc__") or ""
    return " ".join(doc.split())


def _plan(model: type[BaseModel], key: str, plan: dict[type[BaseModel], str]) -> None:
    """First pass: which dotted key documents which model. A model met again (`teachers` repeats
    `teacher`) links to the first table instead of repeating it."""
    plan.setdefault(model, key)
    for name, info in model.model_fields.items():
        for sub in _models_in(info.annotation):
            if sub not in plan:
                child = f"{key}.{name}" if key else name
                _plan(sub, f"{child}[]" if _is_list(info.annotation) else child, plan)


def _describe(info: FieldInfo, comment: str | None, from_yaml: str | None) -> str:
    """Field(description=...) first, then the code's comment, then the shipped params.yaml's, then
    (for a section) its model's docstring."""
    section_doc = next((_model_doc(m) for m in _models_in(info.annotation)), "")
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


_CODE_SPAN = re.compile(r"(`[^`]*`)")


def escape(text: str, in_table: bool = False) -> str:
    """Prose from comments and help strings made safe for markdown: `<class>` is not an HTML tag,
    `*S` starts no emphasis and, in a table cell, `|` splits no column. Code spans are left alone
    (Python-Markdown's tables never split inside them)."""
    parts = _CODE_SPAN.split(text)
    for i in range(0, len(parts), 2):
        plain = parts[i].replace("&", "&amp;").replace("<", "&lt;").replace("*", "\\*")
        parts[i] = plain.replace("|", "\\|") if in_table else plain
    return "".join(parts)


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell: escaped, on one line."""
    return escape(" ".join(text.split()), in_table=True)


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
        yield f"| `{row.key}` | {_cell(row.type)} | {_cell(row.default)} | {_cell(text)} |"
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


# ---------------------------------------------------------------- the command line


def _plain(markup: str | None) -> str:
    """Help text as the terminal shows it: typer renders rich markup (`[bold]`), the page does not."""
    if not markup:
        return ""
    from rich.errors import MarkupError
    from rich.text import Text

    try:
        return Text.from_markup(markup).plain
    except MarkupError:
        return markup


def walk_commands(app: Any = None) -> Iterator[tuple[Any, Any]]:
    """Every visible command of the `kd` app with its context, groups before their commands.
    Importing kd_core.cli registers all commands (they attach to `app` by decorator in their modules).
    Typed `Any` and duck-typed: typer builds on click, or on its own copy of click (typer >= 0.2x)."""
    import typer

    if app is None:
        import kd_core.cli  # noqa: F401  (registers every command on the app)
        from kd_core.cli.app import app
    root = typer.main.get_command(app)
    yield from _walk(root.context_class(root, info_name="kd"))


def _subcommands(ctx: Any) -> list[tuple[str, Any]]:
    """A group's visible commands in its own order; none for a plain command."""
    group = ctx.command
    if not hasattr(group, "list_commands"):
        return []
    subs = [(name, group.get_command(ctx, name)) for name in group.list_commands(ctx)]
    return [(name, cmd) for name, cmd in subs if cmd is not None and not cmd.hidden]


def _walk(ctx: Any) -> Iterator[tuple[Any, Any]]:
    yield ctx, ctx.command
    for name, sub in _subcommands(ctx):
        yield from _walk(sub.context_class(sub, info_name=name, parent=ctx))


def _param_row(param: Any, ctx: Any) -> str | None:
    """One argument or option as the terminal's help shows it (names, metavar, help with its
    `[default: …]` / `[required]` notes); None for a hidden one."""
    if getattr(param, "hidden", False) or (param.is_eager and not param.expose_value):
        return None  # hidden, or --help (every command has it; the page says so once)
    record = param.get_help_record(ctx)
    if record is None:  # click gives none for arguments; typer does
        record = (param.human_readable_name, "[required]" if param.required else "")
    names, help_text = record
    return f"| `{names}` | {_cell(help_text)} |"


def _epilog(text: str) -> list[str]:
    """A command's examples (the epilog typer prints under the options) as a shell block."""
    text = _plain(text).strip()
    if not text:
        return []
    head, _, body = text.partition("\n")
    lines = [ln.strip() for ln in body.splitlines() if ln.strip()]
    if head.strip().lower().startswith("example") and lines:
        return [f"**{head.strip()}**", "", "```bash", *lines, "```", ""]
    return [text, ""]


def _command_markdown(ctx: Any, cmd: Any) -> list[str]:
    """One command: heading, usage, help, arguments and options, examples."""
    usage = " ".join([ctx.command_path, *cmd.collect_usage_pieces(ctx)])
    lines = [f"## `{ctx.command_path}` {{#{anchor(ctx.command_path)}}}", "", "```", usage, "```", ""]
    if help_text := _plain(cmd.help):
        lines += [escape(inspect.cleandoc(help_text)), ""]
    if subs := _subcommands(ctx):
        paths = [f"{ctx.command_path} {name}" for name, _ in subs]
        lines += ["Commands:", "", *(f"- [`{p}`](#{anchor(p)})" for p in paths), ""]
    if rows := [r for p in cmd.get_params(ctx) if (r := _param_row(p, ctx))]:
        lines += ["| argument / option | help |", "|---|---|", *rows, ""]
    return lines + _epilog(cmd.epilog or "")


def cli_markdown(app: Any = None) -> str:
    """The command-line page: every command of `kd`, generated from the typer app."""
    lines = [
        "# Command line reference",
        "",
        "Generated from the typer app (`kd_core/cli/`) by `docs/gen_reference.py` on every docs build.",
        "Every command also takes `--help`, which prints the same.",
        "`kd` finds the project from any subfolder, like `git`.",
        "",
    ]
    for ctx, cmd in walk_commands(app):
        lines += _command_markdown(ctx, cmd)
    return "\n".join(lines)


# ---------------------------------------------------------------- entry points

PAGES = {"cli.md": cli_markdown, "configuration.md": config_markdown}


def write_pages(out: Path) -> None:
    """Write both pages into a folder (`python docs/gen_reference.py DIR`, to read them without mkdocs)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, make in PAGES.items():
        (out / name).write_text(make())


def _gen_files() -> None:
    """Under mkdocs-gen-files: the pages exist only in the build, never in docs/ (nothing to commit)."""
    import mkdocs_gen_files

    for name, make in PAGES.items():
        with mkdocs_gen_files.open(name, "w") as f:
            f.write(make())


if __name__ == "<run_path>":  # mkdocs-gen-files runs its scripts with runpy.run_path
    _gen_files()
elif __name__ == "__main__":
    write_pages(Path(sys.argv[1] if len(sys.argv) > 1 else "build/reference"))
