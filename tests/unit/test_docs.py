"""The docs site stays true to the code: the generated reference pages cover every key the shipped
params files use and every `kd` command, and the README stays short with links that resolve.

The generator (docs/gen_reference.py, which imports its modules in docs/reference/ by path) is not a
package module, so it is loaded by path, as mkdocs-gen-files runs it; nothing here builds the site
(`make docs` does, in strict mode).
"""

from __future__ import annotations

import importlib.util
import re
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PARAMS_FILES = [ROOT / "params.yaml", *sorted((ROOT / "examples").glob("*/params.yaml"))]


@pytest.fixture(scope="module")
def gen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_reference", ROOT / "docs" / "gen_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def yaml_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a params mapping, recursively; a list's items are not descended into."""
    if not isinstance(node, dict):
        return []
    keys = []
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        keys += [dotted, *yaml_keys(value, f"{dotted}.")]
    return keys


@pytest.mark.parametrize("params_file", PARAMS_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_params_key_is_documented(gen: ModuleType, params_file: Path) -> None:
    rows = {row.key: row for row in gen.config_rows()}
    page = gen.config_markdown()
    free_form = [key for key, row in rows.items() if row.mapping]
    missing = []
    for key in yaml_keys(yaml.safe_load(params_file.read_text())):
        if key in rows:
            assert f"`{key}`" in page, key
        elif not any(key.startswith(f"{mapping}.") for mapping in free_form):
            missing.append(key)  # not a field, and not inside a free-form mapping such as teacher.options
    assert not missing, f"{params_file.name}: keys not on the configuration page: {missing}"


def test_free_form_mappings_are_the_only_undocumented_keys(gen: ModuleType) -> None:
    """Keys under `teacher.options` are arguments of an architecture factory, not fields; the page
    must say so, so a reader does not look for them there."""
    rows = gen.config_rows()
    assert any(row.key == "teacher.options" and row.mapping for row in rows)
    assert "free-form mapping" in gen.config_markdown()


def _commands(command: Any, ctx: Any) -> list[str]:
    """Every command path of a (typer) click command tree, walked here rather than by the generator."""
    paths = [ctx.command_path]
    if hasattr(command, "list_commands"):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                paths += _commands(sub, sub.context_class(sub, info_name=name, parent=ctx))
    return paths


def test_every_command_is_on_the_cli_page(gen: ModuleType) -> None:
    import typer

    import kd_core.cli  # noqa: F401  (registers every command)
    from kd_core.cli.app import app

    root = typer.main.get_command(app)
    paths = _commands(root, root.context_class(root, info_name="kd"))
    page = gen.cli_markdown()
    assert {"kd run", "kd stage", "kd cache verify"} <= set(paths)
    missing = [p for p in paths if f"## `{p}`" not in page]
    assert not missing, f"commands missing from cli.md: {missing}"


def test_readme_is_short() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines; move detail into docs/"


class _MkdocsLoader(yaml.SafeLoader):
    """mkdocs.yml names a Python function with a `!!python/name:` tag; read it as null, never import it."""


_MkdocsLoader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: None)


def _nav_pages(nav: Any) -> set[str]:
    """Every page file of mkdocs.yml's nav, generated ones (cli.md, configuration.md) included."""
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, list):
        return {page for item in nav for page in _nav_pages(item)}
    if isinstance(nav, dict):
        return {page for value in nav.values() for page in _nav_pages(value)}
    return set()


def test_readme_links_resolve() -> None:
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_MkdocsLoader)
    docs_dir = ROOT / config.get("docs_dir", "docs")
    pages = {(docs_dir / page).resolve() for page in _nav_pages(config["nav"])}
    links = re.findall(r"\]\(([^)\s]+)\)", README.read_text())
    relative = [link.split("#")[0] for link in links if not re.match(r"[a-z]+:|#", link)]
    assert relative, "README.md links to no docs page"
    broken = [link for link in relative if not (ROOT / link).exists() and (ROOT / link).resolve() not in pages]
    assert not broken, f"README.md links to nothing: {broken}"


def test_comments_explain_fields(gen: ModuleType, tmp_path: Path) -> None:
    """Trailing comments, wrapped comments and comments above a field all reach the page; a comment
    line between two commented fields continues the first (a wrapped sentence)."""
    source = textwrap.dedent('''
        from typing import Literal
        from pydantic import BaseModel, Field

        class Inner(BaseModel):
            """Nested settings."""
            depth: int = Field(3, ge=1)  # how deep: the first part
            # and its wrapped rest
            width: float | None = None  # how wide

        class Outer(BaseModel):
            # what kind, said above the field
            kind: Literal["a", "b"] = "a"
            inner: Inner = Inner()
            items: tuple[Inner, ...] = ()
            options: dict[str, int] = Field(default_factory=dict, description="free arguments")
            plain: str = "x"
        ''')
    path = tmp_path / "docs_fixture_models.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("docs_fixture_models", path)
    assert spec is not None and spec.loader is not None
    models = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = models  # inspect finds a class's source file through sys.modules
    try:
        spec.loader.exec_module(models)
        rows = {r.key: r for r in gen.config_rows(models.Outer, params_yaml=tmp_path / "none.yaml")}
    finally:
        del sys.modules[spec.name]
    assert rows["kind"].description == "what kind, said above the field"
    assert rows["kind"].type == "a | b" and rows["kind"].default == "`a`"
    assert rows["inner.depth"].description == "how deep: the first part and its wrapped rest"
    assert rows["inner.depth"].type == "int (≥ 1)"
    assert rows["inner.width"].description == "how wide" and rows["inner.width"].type == "float | null"
    assert rows["inner"].description == "Nested settings."
    assert "items" in rows and "items[].depth" not in rows  # Inner is documented once, under `inner`
    assert rows["options"].mapping and rows["options"].description == "free arguments"
    assert rows["plain"].description == ""


def test_params_yaml_comments_fill_gaps(gen: ModuleType, tmp_path: Path) -> None:
    """The shipped params.yaml's comments explain fields the code leaves bare: a trailing comment and
    its indented continuation, or the prose of a block directly above a key (its example left out)."""
    params = tmp_path / "params.yaml"
    params.write_text(textwrap.dedent("""\
        # Several of them. Example:
        #   many: [1]
        many: null
        section:
          one: 1        # first part
                        # second part

          two: 2
        """))
    assert gen.yaml_comments(params) == {"many": "Several of them.", "section.one": "first part second part"}
