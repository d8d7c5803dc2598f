"""`selma lora info|convert`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from selma_toolkit.cli.app import FORMAT_HELP, SelmaTyper, app, console
from selma_toolkit.errors import InputError


# ------------------------------------------------------------------------------------------ lora

lora_app = SelmaTyper(help="Inspect and convert LoRA files (kohya, diffusers/peft, ComfyUI layouts).",
                      no_args_is_help=True)
app.add_typer(lora_app, name="lora")
ComponentOption = Annotated[
    Optional[str],
    typer.Option(help="Model part of peft keys that lack a prefix (unet, text_encoder, text_encoder_2)."),
]
DropBiasDiffsOption = Annotated[
    bool, typer.Option("--drop-bias-diffs", help="Drop bias / norm differences (ComfyUI-trained files) a LoRA cannot carry.")
]


@lora_app.command("info")
def lora_info(
    file: Annotated[Path, typer.Argument(help="A LoRA .safetensors file.")],
    component: ComponentOption = None,
    drop_bias_diffs: DropBiasDiffsOption = False,
) -> None:
    """Show a LoRA file: layout, architecture guess, modules, ranks, alphas, metadata."""
    from collections import Counter

    from rich.table import Table

    from selma_toolkit.lora import inspect_lora

    info = inspect_lora(file, component=component, drop_bias_diffs=drop_bias_diffs)
    modules = info.weights.modules
    per_component = Counter(name.split(".", 1)[0] for name in modules)
    ranks = Counter(module.rank for module in modules.values())
    alphas = Counter(float(module.alpha) for module in modules.values())
    conv = sum(module.is_conv for module in modules.values())
    summary = Table(show_header=False, title=escape(str(file)))
    summary.add_row("layout", ", ".join(info.layouts))
    summary.add_row("architecture", info.architecture or "unknown (no shape or metadata tells)")
    summary.add_row("modules", f"{len(modules)} ({', '.join(f'{c} {n}' for c, n in sorted(per_component.items()))}"
                    + (f"; {conv} conv" if conv else "") + ")")
    summary.add_row("ranks", ", ".join(f"{rank} x{count}" for rank, count in sorted(ranks.items())))
    summary.add_row("alphas", ", ".join(f"{alpha:g} x{count}" for alpha, count in sorted(alphas.items())))
    console.print(summary)
    if info.file_metadata:
        table = Table("metadata key", "value", title="__metadata__")
        for key, value in sorted(info.file_metadata.items()):
            table.add_row(escape(key), escape(value if len(value) <= 200 else value[:200] + "..."))
        console.print(table)


@lora_app.command("convert")
def lora_convert(
    source: Annotated[Path, typer.Argument(help="The LoRA .safetensors file to read (any layout).")],
    out: Annotated[Path, typer.Argument(help="The .safetensors file to write.")],
    format_: Annotated[Optional[str], typer.Option("--format", help=FORMAT_HELP)] = None,
    component: ComponentOption = None,
    drop_bias_diffs: DropBiasDiffsOption = False,
) -> None:
    """Convert a LoRA file to its family's default layout (the one diffusers and ComfyUI both load), or --format."""
    from selma_toolkit.lora import load_lora, save_lora
    from selma_toolkit.lora.files import resolve_layout

    if out.resolve() == source.resolve():
        raise InputError(f"{out}: the output would overwrite the input; choose another file name")
    weights = load_lora(source, component=component, drop_bias_diffs=drop_bias_diffs)
    layout = resolve_layout(weights, format_)
    save_lora(weights, out, format=layout)  # type: ignore[arg-type]
    console.print(f"wrote {len(weights.modules)} modules in the {layout} layout to {escape(str(out))}", highlight=False)
