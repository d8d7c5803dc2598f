"""The typer app every `selma` command registers on, its consoles, and helpers shared by commands."""

from __future__ import annotations

import logging
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup

from selma_toolkit import __version__

# Written to a terminal, lines wrap at its width. Piped to a file or another program, rich would wrap
# them at 80 columns and cut paths in two, so a line printed there is never wrapped (soft_wrap).
console = Console()
err_console = Console(stderr=True)
for _console in (console, err_console):
    _console.soft_wrap = not _console.is_terminal

# A parameter's metavar where its type's name (TEXT, INTEGER, PATH) says less than it could.
_METAVARS = {"set_": "KEY=VALUE", "run_dir": "RUN"}
_TYPE_NAMES = {"int": "INTEGER", "float": "NUMBER", "str": "TEXT", "Path": "PATH"}


def _plain_metavars(params: list[Any]) -> None:
    """Give each parameter the metavar click would (RECIPE, INTEGER, PATH; none for a flag): typer
    0.2x's own are Python types (<bool>, <list[str]>, {recipe}), which a user never types."""
    for param in params:
        if param.metavar is not None:
            continue
        if param.param_type_name == "argument":
            param.metavar = _METAVARS.get(param.name or "") or (param.name or "").upper()
            param.__class__ = _PlainArgument  # typer builds its own TyperArgument; this one only shows no type
        elif getattr(param, "is_flag", False) or getattr(param, "count", False):
            param.metavar = ""
        else:
            element = param.bare_type().removeprefix("list[").removesuffix("]")
            param.metavar = _METAVARS.get(param.name or "") or _TYPE_NAMES.get(element, element.upper())


class _PlainArgument(TyperArgument):
    """An argument whose help names it by its metavar alone (RECIPE), without a Python type beside it."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None


class _PlainHelp:
    """Plain metavars (see :func:`_plain_metavars`) for a command's or group's parameters and --help."""

    params: list[Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _plain_metavars(self.params)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class PlainHelpGroup(_PlainHelp, TyperGroup):
    """A command group whose help shows plain metavars."""


class PlainHelpCommand(_PlainHelp, TyperCommand):
    """A command whose help shows plain metavars and its usage line click's way: ``RECIPE`` required,
    ``[RUN]`` optional, ``EXPERTS...`` repeated (typer 0.2x writes ``{recipe}``)."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = f"{param.metavar}{'...' if param.nargs != 1 else ''}"
                pieces.append(name if param.required else f"[{name}]")
        return pieces


class SelmaTyper(typer.Typer):
    """The `selma` app and its command groups: plain metavars in every help page."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(cls=PlainHelpGroup, **kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", PlainHelpCommand)
        return super().command(*args, **kwargs)


app = SelmaTyper(
    name="selma",
    help="SELMA skill experts for text-to-image models: prompts -> images -> LoRA experts -> merge.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a recipe value, e.g. --set train.steps=100 (repeatable)."),
]


def _version(value: bool) -> None:
    if value:
        console.print(f"selma-toolkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
) -> None:
    from rich.logging import RichHandler

    if err_console.is_terminal:
        handler: logging.Handler = RichHandler(console=err_console, show_path=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        # Piped or written to a file: rich's log table would pad and wrap each line at 80 columns
        # (cutting paths); a plain line keeps every message whole and easy to grep.
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s", "%H:%M:%S"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
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


# `selma lora convert` and `selma merge --format`; no torch import for --help (the layouts are lora/writing.py's WRITE_FORMATS).
FORMAT_HELP = (
    "The file layout: kohya, peft or ai-toolkit. Default: the family's, which diffusers and ComfyUI both "
    "load (kohya for SD 1.x / 2.x / XL; peft, transformer.*.lora_A/B, for SD 3, Flux, Chroma; "
    "ai-toolkit, diffusion_model.*.lora_A/B, for Qwen-Image, Z-Image, FLUX.2 [klein])."
)
