"""Markdown helpers shared by both pages: explicit heading ids and escaping of prose."""

from __future__ import annotations

import re


def anchor(key: str | None) -> str:
    """A section's HTML id (set explicitly with attr_list, so links never depend on slugify rules)."""
    return "top" if not key else re.sub(r"[^a-z0-9]+", "-", key.lower()).strip("-")


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


def cell(text: str) -> str:
    """Text safe inside a markdown table cell: escaped, on one line."""
    return escape(" ".join(text.split()), in_table=True)
