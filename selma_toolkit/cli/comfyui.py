"""`selma comfyui install`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from selma_toolkit.cli.app import SelmaTyper, app, console, err_console

comfyui_app = SelmaTyper(help="The SELMA node pack for ComfyUI.", no_args_is_help=True)
app.add_typer(comfyui_app, name="comfyui")


@comfyui_app.command("install")
def comfyui_install(
    comfyui_dir: Annotated[Path, typer.Argument(help="The ComfyUI folder (the one with main.py and custom_nodes/).")],
) -> None:
    """Copy the node pack into COMFYUI_DIR/custom_nodes/selma-toolkit (run again to update it)."""
    from comfyui_nodes.install import base_directory_note, install_node_pack

    target = install_node_pack(comfyui_dir)
    console.print(
        f"installed the SELMA nodes into {escape(str(target))}; restart ComfyUI to load them "
        "(its Python needs torch and safetensors)",
        highlight=False,
    )
    note = base_directory_note(comfyui_dir)
    if note:
        err_console.print(f"warning: {escape(note)}", highlight=False)
