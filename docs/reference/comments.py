"""The explanations the pages show: `# comments` on pydantic fields in the code, and the comments of
a commented params.yaml (the fallback for fields the code leaves bare).

Comments are read with `tokenize` and `ast`, never by regex over Python, so a `#` inside a string is
never one; params.yaml is read line by line, since YAML parsers drop comments.
"""

from __future__ import annotations

import ast
import inspect
import io
import re
import tokenize
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[2]
PARAMS_YAML = ROOT / "params.yaml"

# ---------------------------------------------------------------- in the Python sources


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


# ---------------------------------------------------------------- in params.yaml

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
