"""`kd`: the command line. Wiring and presentation only; the work happens in kd_core.stages and the
library. User mistakes (UserError) print one line on stderr and exit 1 (75 for a transient outage),
never a traceback. Prefect, MLflow, torch and Great Expectations load only inside the commands that
use them, so `kd --help` and `kd stage prepare` start fast.
"""

from __future__ import annotations

import sys

import typer

from kd_core.cli import cache, outputs, pipeline, registry  # noqa: F401  (each registers its commands on `app`)
from kd_core.cli.app import app
from kd_core.errors import UserError


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 1."""
    try:
        app(standalone_mode=False)
    except UserError as exc:
        print(f"kd: error: {exc}", file=sys.stderr)
        sys.exit(getattr(exc, "exit_code", 1))
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:
        import click

        # a usage error (unknown command or option): click's, or the copy of click typer >= 0.29 carries
        usage = (click.ClickException, *((typer.TyperException,) if hasattr(typer, "TyperException") else ()))
        if isinstance(exc, usage) and hasattr(exc, "show"):
            exc.show()
            sys.exit(getattr(exc, "exit_code", 2))
        raise


__all__ = ["app", "main"]
