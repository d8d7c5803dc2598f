"""`selma tiny create`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from selma_toolkit.architectures import FAMILY_NAMES
from selma_toolkit.cli.app import SelmaTyper, app, console
from selma_toolkit.errors import InputError

tiny_app = SelmaTyper(help="The embedded tiny models (no download needed).", no_args_is_help=True)
app.add_typer(tiny_app, name="tiny")


@tiny_app.command("create")
def tiny_create(
    out: Annotated[Path, typer.Argument(help="New folder for the model.")],
    arch: Annotated[str, typer.Option(help=f"Model family: {', '.join(FAMILY_NAMES)}.")] = "sd1",
    seed: Annotated[int, typer.Option(help="Weights seed: the same seed writes the same weights.")] = 0,
) -> None:
    """Write a tiny random text-to-image model in the diffusers folder layout."""
    from selma_toolkit.tiny import ARCHITECTURES, create_tiny_model

    if arch not in ARCHITECTURES:
        raise InputError(f"--arch {arch!r}: expected one of {', '.join(ARCHITECTURES)}")
    try:
        path = create_tiny_model(out, arch, seed)  # type: ignore[arg-type]
    except FileExistsError as exc:
        raise InputError(str(exc)) from None
    console.print(f"wrote tiny {arch} model to {path} (load it with DiffusionPipeline.from_pretrained)")
