"""The card as a list of blocks, rendered twice: markdown (the card of record, `model_card.md`) and a
self-contained HTML page made from that markdown by markdown-it-py, with every figure embedded.
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from markdown_it import MarkdownIt


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Para:
    text: str  # inline `code`, **bold** and [text](href) are rendered in both formats


@dataclass(frozen=True)
class Bullets:
    items: Sequence[str]


@dataclass(frozen=True)
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    align_right: bool = True  # numbers right-aligned; the first column stays left


@dataclass(frozen=True)
class Image:
    file: str  # relative to the card, e.g. figures/reliability.png
    caption: str


@dataclass(frozen=True)
class Code:
    text: str


Block = Heading | Para | Bullets | Table | Image | Code


def to_markdown(blocks: Sequence[Block]) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"{'#' * b.level} {b.text}")
        elif isinstance(b, Para):
            out.append(b.text)
        elif isinstance(b, Bullets):
            out.append("\n".join(f"- {item}" for item in b.items))
        elif isinstance(b, Table):
            sep = ["---"] + [("---:" if b.align_right else "---")] * (len(b.header) - 1)
            lines = [b.header, sep, *b.rows]
            out.append("\n".join("| " + " | ".join(cells) + " |" for cells in lines))
        elif isinstance(b, Image):
            out.append(f"![{b.caption}]({b.file})\n\n*{b.caption}*")
        elif isinstance(b, Code):
            out.append(f"```bash\n{b.text}\n```")
    return "\n\n".join(out) + "\n"


_CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1000px;margin:2em auto;
padding:0 1.2em;color:#222}
h1{font-size:1.7em;border-bottom:2px solid #dd8452;padding-bottom:.2em}h2{margin-top:1.8em;font-size:1.3em}
table{border-collapse:collapse;margin:.6em 0}th,td{padding:.3em .7em;border-bottom:1px solid #ddd}
th{background:#f4f4f4;text-align:left;vertical-align:bottom}th.n{text-align:right}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}td:first-child{white-space:nowrap}
code{background:#f4f4f4;padding:0 .25em;border-radius:3px}pre{background:#f4f4f4;padding:.8em;overflow:auto}
figure{margin:1em 0}figure img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
figure.half{display:inline-block;width:48.5%;margin:1em 0;vertical-align:top}figure.half+figure.half{margin-left:2%}
"""


def _embedded_image(base: Path):
    """markdown-it's image rule, replaced: the PNG as a data URI, its file name kept in `data-file`, so a
    reader (or a test) can tell which figure is which and the page needs nothing beside it."""
    def render(_renderer, tokens, idx, _options, _env) -> str:
        token = tokens[idx]
        file = token.attrGet("src")
        png = base64.b64encode((base / file).read_bytes()).decode()
        alt = html.escape(token.content)
        return f'<img src="data:image/png;base64,{png}" data-file="{html.escape(file)}" alt="{alt}">'
    return render


def to_html(blocks: Sequence[Block], title: str, base: Path) -> str:
    """The markdown card as one HTML page; figures are read from `base`/file and embedded."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    md.add_render_rule("image", _embedded_image(base))
    body = md.render(to_markdown(blocks))
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_CSS}</style></head><body>\n{body}</body></html>\n")
