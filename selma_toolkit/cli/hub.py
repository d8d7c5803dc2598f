"""`selma hub push|pull|list` (the library side: selma_toolkit/hub.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from selma_toolkit.cli.app import SelmaTyper, app, console

# ------------------------------------------------------------------------------------------- hub

hub_app = SelmaTyper(
    help="Share and fetch experts on the Hugging Face Hub (push, pull, catalog).", no_args_is_help=True
)
app.add_typer(hub_app, name="hub")
CatalogOption = Annotated[
    list[Path] | None,
    typer.Option(
        "--catalog",
        help="Your own catalog file (TOML, as hub/catalog.toml); repeatable. SELMA_CATALOG=FILE works for every command.",
    ),
]


@hub_app.command("push")
def hub_push(
    path: Annotated[Path, typer.Argument(help="An expert .safetensors file, a merged LoRA, or a run folder.")],
    repo_id: Annotated[str, typer.Argument(help="Target model repo, owner/name (created if needed).")],
    private: Annotated[
        bool, typer.Option("--private", help="Create the repo as private (if it does not exist yet).")
    ] = False,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch to commit to (created if needed).")] = None,
    message: Annotated[str | None, typer.Option("--message", "-m", help="Commit message.")] = None,
) -> None:
    """Upload LoRA file(s), a model card, the recipe, scores and samples in one commit. Token: `hf auth login` or HF_TOKEN."""
    from selma_toolkit.hub import push_expert

    url = push_expert(path, repo_id, private=private, revision=revision, commit_message=message)
    console.print(f"pushed to {escape(url)}", highlight=False, soft_wrap=True)


@hub_app.command("pull")
def hub_pull(
    ref: Annotated[
        str, typer.Argument(help="A catalog name, or a repo owner/name (owner/name:FILE for one of several files).")
    ],
    revision: Annotated[str | None, typer.Option("--revision", help="Branch, tag or commit.")] = None,
    to: Annotated[
        Path | None, typer.Option("--to", help="Also copy the file into this folder (e.g. ComfyUI/models/loras).")
    ] = None,
    file: Annotated[
        str | None, typer.Option("--file", help="The .safetensors file in the repo, when it holds several.")
    ] = None,
    catalog: CatalogOption = None,
) -> None:
    """Download an expert into the Hugging Face cache (works offline from the cache) and print its local path.

    A catalog entry of kind extract (`selma hub list`) downloads its two models, extracts the LoRA once and keeps it
    in the extraction cache ($SELMA_CACHE/extractions); pulling it again is instant."""
    from selma_toolkit.experts import resolve_expert_file

    path = resolve_expert_file(ref, catalog=catalog, revision=revision, to=to, filename=file).path
    sys.stdout.write(f"{path}\n")


@hub_app.command("list")
def hub_list(catalog: CatalogOption = None) -> None:
    """Show the catalog of published experts (and your own with --catalog)."""
    from rich.table import Column, Table

    from selma_toolkit.hub import load_catalog

    entries = load_catalog(catalog)
    if not entries:
        console.print("the catalog is empty: no expert has been published in it yet; add your own with --catalog FILE")
        return
    table = Table(Column("name", no_wrap=True), "kind", "family", "skill", "base model", "source", "pinned")
    for entry in sorted(entries.values(), key=lambda e: e.name):
        if entry.extract is not None:  # made by `selma hub pull`: this fine-tuned model minus its base model
            source = entry.extract.model
            pinned = "revisions" if entry.extract.model_revision and entry.extract.base_revision else "-"
        else:
            source, pinned = f"{entry.repo}:{entry.file}", "sha256" if entry.sha256 else "-"
        row = (entry.name, entry.kind, entry.architecture, entry.skill or "-", entry.base_model, source, pinned)
        table.add_row(*(escape(v) for v in row))
    console.print(table)
