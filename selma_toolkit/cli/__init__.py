"""The `selma` command line: parses arguments, loads recipes, calls one library function.

No logic lives here beyond argument handling and printing. Heavy imports (torch, diffusers) happen
inside the commands, so `selma --help` starts fast. A SelmaError prints its message in the CLI's
words (``words.py``: options as flags) and exits with its ``exit_code`` (2: bad input, 1: a
runtime failure; selma_toolkit/errors.py), without a traceback unless --verbose; anything else is
a bug and keeps its traceback.

``app.py`` holds the typer app and shared helpers; each other module registers one area's
commands on it when imported (below).
"""

from __future__ import annotations

import logging
import sys

from rich.markup import escape

# Importing a module registers its commands; this order is the order of `selma --help`.
from selma_toolkit.cli import check, comfyui, hub, lora, recipes, runs, skill, stages, tiny, toyworld  # noqa: F401
from selma_toolkit.cli.app import app, err_console
from selma_toolkit.cli.words import cli_message
from selma_toolkit.errors import SelmaError

__all__ = ["app", "main"]


def main() -> None:
    """Entry point of the `selma` console script."""
    try:
        app()
    except SelmaError as exc:
        # The traceback goes to the debug log: shown with --verbose (for a bug report), hidden otherwise.
        logging.getLogger(__name__).debug("where this error was raised:", exc_info=exc)
        err_console.print(f"[bold red]error:[/bold red] {escape(cli_message(exc))}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
