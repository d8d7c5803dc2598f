"""The typer app every `selma` command registers on, its consoles, and helpers shared by commands."""

from __future__ import annotations

import logging
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from selma_toolkit import __version__


console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="selma",
    help="SELMA skill experts for text-to-image models: prompts -> images -> LoRA experts -> merge.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a recipe value, e.g. --set train.steps=100 (repeatable)."),
]


def _version(value: bool) -> None:
    if value:
        console.print(f"selma-toolkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
    )
    if not verbose:
        logging.getLogger("transformers.utils.import_utils").addFilter(_drop_torchvision_fallback_note)


def _drop_torchvision_fallback_note(record: logging.LogRecord) -> bool:
    # diffusers' SD pipelines import CLIPImageProcessor (their feature extractor); on a CPU install
    # without torchvision, transformers 5 then warns that it uses the PIL image processor, which is
    # what these pipelines have always used. Nothing for a user to do: shown only with --verbose.
    return "requires torchvision (not installed)" not in record.getMessage()


def quiet_loading_bars() -> None:
    # diffusers and transformers draw a tqdm bar per model load; they would tear up the rich bar.
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


STAGE_MARKS = {"skip": "[dim]skip[/dim] ", "start": "[cyan]run[/cyan]  ", "done": "[green]done[/green] "}


def stage_line(state, action: str | None = None) -> str:
    target = f" {state.target}" if state.target else ""
    mark = STAGE_MARKS[action] if action else ("[green]done[/green] " if state.done else "[yellow]todo[/yellow] ")
    note = " (complete)" if action == "skip" else ""
    return f"{mark}{state.stage}{escape(target)}: {escape(state.detail)}{note}"


def run_with_progress(work):
    """Call ``work(on_stage, progress)`` under one rich progress display: a status line per stage, a bar per task."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    quiet_loading_bars()
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("accelerate").setLevel(logging.WARNING)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def on_stage(state, action: str) -> None:
            bar.console.print(stage_line(state, action), highlight=False, soft_wrap=True)

        def progress(label: str, done: int, total: int | None) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done, total=total)

        return work(on_stage, progress)


def set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
