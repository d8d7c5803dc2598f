"""Expert references: what a user writes for an expert -> a local, verified ``.safetensors`` file.

A reference is a local file, a catalog name (``countbench``) or a Hub repo id (``owner/name``,
``owner/name:path/in/repo.safetensors``). Every caller resolves through this module: the diffusers
adapter, the ComfyUI Hub Expert node, `selma merge` (and `--add`), the run checks of `selma run`,
`selma evaluate --before` and `selma hub pull`. Downloads are ``selma_toolkit.hub``'s.

An :class:`ExpertFile` carries what a merge record keeps of its reference (``source``). Its sha256
is not taken here: the merge hashes each file from the same bytes it reads (one read per file).

:func:`listed_expert_places` is where `selma merge --add` also looks for the experts a merged file
lists (its recorded catalog names and repo ids, a run folder's listed experts); ``lora/`` calls it
only when given it, so the LoRA library never imports the Hub or recipe code.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from selma_toolkit.errors import SelmaError
from selma_toolkit.hub import resolve_expert
from selma_toolkit.lora.incremental import is_file_source


@dataclass(frozen=True)
class ExpertFile:
    """A resolved reference. ``source``: the catalog name or repo id it was given as (kept in merge
    records so that an incremental merge can resolve it again), None for a local file (recorded by
    its path relative to the merged file)."""

    ref: str
    path: Path
    source: str | None


def resolve_expert_file(ref: str | Path, **hub_options) -> ExpertFile:
    """``ref`` as a local file: as it is when it is one, else from the catalog / Hub
    (``hub_options``: catalog, revision, to, filename, endpoint, token; see ``hub.resolve_expert``)."""
    text = str(ref)
    local = Path(text).expanduser().is_file()
    return ExpertFile(text, Path(resolve_expert(ref, **hub_options)), None if local else text)


def resolve_expert_files(refs: Sequence[str | Path], **hub_options) -> list[ExpertFile]:
    """Every reference of ``refs``, in order."""
    return [resolve_expert_file(ref, **hub_options) for ref in refs]


def listed_expert_places(merged: Path, entry: dict) -> Iterator[tuple[str, Path | None]]:
    """(where, file) for the places of one expert listed in ``merged``'s record beyond the files
    themselves: its recorded catalog name or repo id, and a run folder's listed experts (the run's
    recipe.toml). The file is None when a reference cannot be resolved (the reason in ``where``)."""
    source = entry.get("source")
    if source and not is_file_source(source):
        yield from _resolved(source, f"recorded source {source!r}")
    run_root = merged.resolve().parent.parent
    if (run_root / "recipe.toml").is_file():
        from selma_toolkit.recipe import read_toml

        for ref in read_toml(run_root / "recipe.toml").get("experts", []):
            yield from _resolved(str(ref), f"the run's listed expert {ref!r}")


def _resolved(ref: str, where: str) -> Iterator[tuple[str, Path | None]]:
    try:
        yield where, resolve_expert_file(ref).path
    except SelmaError as exc:
        yield f"{where} ({exc})", None
