"""The docs' reference pages, generated from the code so they cannot drift from it.

`cli.md` comes from the typer app (every registered command, its usage, arguments and options) and
`configuration.md` from the pydantic params models (every key of `params.yaml`, its type, default and
explanation). mkdocs-gen-files runs this file on every `mkdocs build` (mkdocs.yml); the functions are
pure and generic over the app and the models, so fields and commands added later appear on their own
and tests/unit/test_docs.py can call them without mkdocs. `python docs/gen_reference.py DIR` writes
both pages into DIR, to read them without building the site.

This file only wires: the work is in the `reference/` folder beside it (comments.py, fields.py,
markup.py, config_page.py, cli_page.py), whose public names it re-exports.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PACKAGE = "kd_docs_reference"


def _import_package() -> None:
    """Import `reference/` beside this file as the package `kd_docs_reference`, by path: mkdocs-gen-files
    runs this file with runpy.run_path, which puts no folder on sys.path (and sys.path stays as it is).
    Afresh on every run, as when all of it was one file, so `mkdocs serve` rebuilds with edited modules
    and re-reads the comments."""
    for name in [n for n in sys.modules if n == _PACKAGE or n.startswith(f"{_PACKAGE}.")]:
        del sys.modules[name]
    folder = Path(__file__).resolve().with_name("reference")
    spec = importlib.util.spec_from_file_location(_PACKAGE, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    assert spec is not None and spec.loader is not None
    package = importlib.util.module_from_spec(spec)
    sys.modules[_PACKAGE] = package  # its modules' relative imports find it here
    spec.loader.exec_module(package)


_import_package()

from kd_docs_reference.cli_page import cli_markdown, walk_commands  # noqa: E402
from kd_docs_reference.comments import PARAMS_YAML, ROOT, field_comments, yaml_comments  # noqa: E402
from kd_docs_reference.config_page import (  # noqa: E402
    Row,
    Section,
    config_markdown,
    config_rows,
    config_sections,
)
from kd_docs_reference.fields import constraints, default_of, is_mapping, type_name, yaml_value  # noqa: E402
from kd_docs_reference.markup import anchor, escape  # noqa: E402

__all__ = [
    "PAGES", "PARAMS_YAML", "ROOT", "Row", "Section", "anchor", "cli_markdown", "config_markdown",
    "config_rows", "config_sections", "constraints", "default_of", "escape", "field_comments",
    "is_mapping", "type_name", "walk_commands", "write_pages", "yaml_comments", "yaml_value",
]

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
