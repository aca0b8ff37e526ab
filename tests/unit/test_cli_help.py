"""Every `kd` command's --help shows at least one example, so new commands cannot ship without one."""

import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from kd_core.cli import app


def _leaf_commands(group: typer.core.TyperGroup, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name, cmd in group.commands.items():
        if hasattr(cmd, "commands"):  # a group; duck-typed, since typer may vendor its own click
            out += _leaf_commands(cmd, (*prefix, name))
        else:
            out.append((*prefix, name))
    return out


COMMANDS = _leaf_commands(typer.main.get_command(app))


def test_the_user_facing_commands_exist():
    assert {("status",), ("compare",), ("predict",), ("export",), ("run",), ("stage",),
            ("cache", "verify"), ("cache", "ls"), ("cache", "gc")} <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_has_an_example(command: tuple[str, ...]):
    res = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "120"})
    assert res.exit_code == 0, res.output
    assert "example" in res.output.lower() and f"kd {' '.join(command)}" in res.output, res.output


def test_importing_the_cli_loads_no_heavy_library():
    """`kd --help` and `kd stage prepare` must not pay for MLflow, torch, Prefect or GX at import."""
    code = ("import sys, kd_core.cli; heavy = ('mlflow', 'torch', 'prefect', 'great_expectations', 'dvc', "
            "'matplotlib', 'onnx', 'pandas'); print([m for m in heavy if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out


@pytest.mark.parametrize("args", [["nocommand"], ["stage", "--no-such-option"]], ids=["command", "option"])
def test_a_usage_mistake_is_a_usage_line_not_a_traceback(args: list[str]):
    res = subprocess.run([sys.executable, "-m", "kd_core.cli", *args], capture_output=True, text=True, check=False)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr and "No such" in res.stderr
