"""`selma lora info|convert|extract`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from selma_toolkit.cli.app import FORMAT_HELP, SelmaTyper, app, console
from selma_toolkit.errors import InputError

# ------------------------------------------------------------------------------------------ lora

lora_app = SelmaTyper(
    help="Inspect and convert LoRA files (kohya, diffusers/peft, ComfyUI layouts).", no_args_is_help=True
)
app.add_typer(lora_app, name="lora")
ComponentOption = Annotated[
    str | None,
    typer.Option(help="Model part of peft keys that lack a prefix (unet, text_encoder, text_encoder_2)."),
]
DropBiasDiffsOption = Annotated[
    bool,
    typer.Option("--drop-bias-diffs", help="Drop bias / norm differences (ComfyUI-trained files) a LoRA cannot carry."),
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
    summary.add_row(
        "modules",
        f"{len(modules)} ({', '.join(f'{c} {n}' for c, n in sorted(per_component.items()))}"
        + (f"; {conv} conv" if conv else "")
        + ")",
    )
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
    format_: Annotated[str | None, typer.Option("--format", help=FORMAT_HELP)] = None,
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


ModelRef = "a diffusers folder, a single-file .safetensors checkpoint, or a Hub repo id (owner/name[:FILE])"
ExtractModel = Annotated[str, typer.Option("--model", help=f"The fine-tuned model: {ModelRef}.")]
ExtractBase = Annotated[str, typer.Option("--base", help="The model it was trained from (the same forms).")]
ExtractRank = Annotated[
    str,
    typer.Option(
        "--rank",
        help="auto: each layer's rank read from its spectrum against the rounding floor of the stored weights; "
        "N: the best rank-N approximation (full fine-tunes).",
    ),
]
ExtractParts = Annotated[
    str | None,
    typer.Option(
        "--components",
        help="Model parts to compare, comma-separated, e.g. unet (default: every part both models have).",
    ),
]
AllowPickle = Annotated[
    bool,
    typer.Option(
        "--allow-pickle",
        help="Read .bin / .ckpt weights with torch's weights-only loader (refused otherwise: pickles run code).",
    ),
]


@lora_app.command("extract")
def lora_extract(
    model: ExtractModel,
    base: ExtractBase,
    out: Annotated[Path, typer.Option("--out", help="The LoRA .safetensors file to write.")],
    rank: ExtractRank = "auto",
    components: ExtractParts = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit of a Hub --model.")] = None,
    base_revision: Annotated[str | None, typer.Option("--base-revision", help="The same for a Hub --base.")] = None,
    format_: Annotated[str | None, typer.Option("--format", help=FORMAT_HELP)] = None,
    allow_pickle: AllowPickle = False,
    report: Annotated[Path | None, typer.Option("--report", help="Also write each layer's figures here.")] = None,
) -> None:
    """Extract the LoRA between a fine-tuned model and its base: each layer's difference at its spectrum's rank."""
    import json
    from dataclasses import asdict

    from selma_toolkit.cli.app import run_with_progress
    from selma_toolkit.hub.extraction import extract_models
    from selma_toolkit.io import atomic_write_text, check_output_file
    from selma_toolkit.lora.extract import save_extraction
    from selma_toolkit.lora.files import resolve_layout

    check_output_file(out)
    parts = [part.strip() for part in components.split(",") if part.strip()] if components else None
    extraction = run_with_progress(
        lambda on_stage, progress: extract_models(
            model,
            base,
            revision=revision,
            base_revision=base_revision,
            rank=rank,
            components=parts,
            allow_pickle=allow_pickle,
            progress=progress,
        )
    )
    layout = resolve_layout(extraction.weights, format_)
    save_extraction(extraction, out, format=layout)
    print_extraction(extraction)
    if report is not None:
        layers = [asdict(layer) for layer in extraction.layers]
        atomic_write_text(report, json.dumps({"summary": extraction.summary(), "layers": layers}, indent=1) + "\n")
    console.print(
        f"wrote {len(extraction.weights.modules)} modules in the {layout} layout to {escape(str(out))}", highlight=False
    )


def print_extraction(extraction) -> None:
    """The findings: layers changed / unchanged, ranks stored and found, full-rank layers, captured energy."""
    from rich.table import Table

    summary = extraction.summary()
    table = Table(show_header=False, title="extraction")
    for role, source in (("fine-tuned", extraction.model), ("base", extraction.base)):
        at = f"@{source.revision} ({source.commit[:10]})" if source.commit else ""
        table.add_row(role, escape(source.ref + at))
    table.add_row("architecture", extraction.family or "unknown")
    table.add_row(
        "layers compared",
        f"{summary['compared']}: {summary['changed']} changed ({summary['low_rank']} "
        f"low-rank, {summary['full_rank']} full-rank), {summary['unchanged']} unchanged (within the floor)",
    )
    auto = extraction.rank == "auto"
    table.add_row("rank", f"{extraction.rank}" + (" (read from each layer's spectrum)" if auto else ""))
    table.add_row(
        "captured energy", f"min {summary['energy_min']:.4f}, median {summary['energy_median']:.4f} (low-rank layers)"
    )
    table.add_row("|D| / |W|", f"median {summary['relative_median']:.3g}")
    table.add_row("est. error / raw difference", f"{summary['error_vs_raw']:.3f} (1: no better than the difference)")
    console.print(table)
    ranks = Table("stored rank", "layers", "found rank (above the floor)", "layers", title="ranks")
    stored, found = list(summary["ranks"].items()), list(summary["found_ranks"].items())
    for index in range(max(len(stored), len(found))):
        left = stored[index] if index < len(stored) else ("", "")
        right = found[index] if index < len(found) else ("", "")
        ranks.add_row(str(left[0]), str(left[1]), str(right[0]), str(right[1]))
    console.print(ranks)
    if summary["full_rank_widths"]:
        widths = ", ".join(f"{count} of width {width}" for width, count in summary["full_rank_widths"].items())
        console.print(f"full-rank layers (stored exactly as the difference): {widths}", highlight=False)
