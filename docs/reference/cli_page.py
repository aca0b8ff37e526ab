"""The command-line page: every visible command of the `kd` typer app, with its usage, help,
arguments and options, and examples."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import Any

from .markup import anchor, cell, escape


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
    return f"| `{names}` | {cell(help_text)} |"


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
