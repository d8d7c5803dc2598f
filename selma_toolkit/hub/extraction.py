"""LoRAs extracted from Hub models: a model reference (local folder or file, Hub repo id) made
local by downloading only what an extraction reads, and the catalog's ``extract`` entries pulled
through a cache keyed by both models' commits and the rank, so a second pull is instant.

Downloads go through the Hugging Face cache (``snapshot_download`` with ``allow_patterns``):
``model_index.json``, each compared model part's ``config.json`` and weights, the fp16 variant
when the repo has one (half the bytes; the extraction's noise floor follows the stored dtype), no
VAE, tokenizer or safety checker. Pickle-only parts are refused unless ``allow_pickle``.

Extractions of catalog entries are kept under ``$SELMA_CACHE/extractions/<name>/<key>/`` (the
LoRA as ``<name>.safetensors`` and ``record.json``); the ComfyUI Hub node only ever takes one
from there (:func:`cached_extraction`), since a queued graph must not download several GB.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

from selma_toolkit.architectures import COMPONENTS
from selma_toolkit.errors import HubError, ModelError, Option, Remedy
from selma_toolkit.hub.catalog import CatalogEntry
from selma_toolkit.hub.connection import hub_errors
from selma_toolkit.hub.names import REPO_ID, check_repo_id, check_repo_path
from selma_toolkit.io import atomic_open, atomic_write_text
from selma_toolkit.lora.extract import (
    EXTRACTION_VERSION,
    Extraction,
    Source,
    extract_lora,
    extraction_metadata,
    save_extraction,
)
from selma_toolkit.lora.model_weights import PICKLE_OPT_IN, variant_file
from selma_toolkit.lora.safetensors_file import PICKLE_SUFFIXES
from selma_toolkit.tiny import cache_dir

log = logging.getLogger(__name__)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def is_hub_model(ref: str) -> bool:
    """Whether ``ref`` names a Hub repo (``owner/name``, or ``owner/name:path/file.safetensors``
    for a single-file checkpoint in it) rather than a local path."""
    repo_id, _, _ = ref.partition(":")
    return (
        not Path(ref).expanduser().exists()
        and REPO_ID.match(repo_id) is not None
        and not ref.startswith((".", "/", "~"))
    )


def hub_listing(
    repo_id: str, revision: str | None, endpoint: str | None, token: str | bool | None
) -> tuple[str, list[str]]:
    """(commit, file names) of a model repo at ``revision`` (default main): from the Hub, or
    from the local cache in offline mode."""
    from huggingface_hub import HfApi, is_offline_mode, snapshot_download

    check_repo_id(repo_id)
    with hub_errors(f"{repo_id}@{revision or 'main'}", endpoint):
        if is_offline_mode():
            folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
            names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
            return folder.name, names
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision or "main", token=token)
    names = [sibling.rfilename for sibling in info.siblings or []]
    for name in names:
        check_repo_path(name, f"{repo_id}: file listed by the server")
    return str(info.sha), names


def resolve_commit(
    repo_id: str, revision: str | None, endpoint: str | None = None, token: str | bool | None = None
) -> str:
    """The commit sha a revision names (a full sha is returned as it is, without a request)."""
    if revision and _COMMIT.match(revision):
        return revision
    return hub_listing(repo_id, revision, endpoint, token)[0]


def model_parts(names: list[str]) -> set[str]:
    """The model parts (unet, text_encoder...) a diffusers repo has folders for."""
    return {name.split("/", 1)[0] for name in names if "/" in name and name.split("/", 1)[0] in COMPONENTS}


def files_to_fetch(names: list[str], components: set[str], *, allow_pickle: bool, label: str) -> list[str]:
    """What an extraction of ``components`` reads from a diffusers repo listing: model_index.json,
    each part's config.json and weights (the fp16 variant when there is one, with its index)."""
    fetch = [name for name in ("model_index.json",) if name in names]
    for component in sorted(components):
        files = [n for n in names if n.startswith(component + "/") and n.count("/") == 1]
        fetch += [n for n in files if n.endswith("/config.json")]
        weights = [n for n in files if n.endswith(".safetensors")]
        if not weights:
            pickles = [n for n in files if n.lower().endswith(PICKLE_SUFFIXES)]
            if pickles and not allow_pickle:
                raise ModelError(
                    what=f"holds its weights only in pickle files ({', '.join(pickles[:3])}), and loading a pickle "
                    "can run arbitrary code",
                    where=(label, f"{component}/"),
                    remedies=[PICKLE_OPT_IN],
                )
            weights = pickles
        fp16 = [n for n in weights if variant_file(n) and ".fp16" in n]
        chosen = fp16 or [n for n in weights if not variant_file(n)]
        if not chosen:
            raise ModelError(f"{label}: {component}/ has no weight file")
        suffix = ".fp16.json" if fp16 else ".json"
        fetch += chosen + [n for n in files if ".index" in n and n.endswith(suffix) and (fp16 or not variant_file(n))]
    return fetch


def fetch_model(
    ref: str,
    revision: str | None,
    components: set[str] | None,
    *,
    allow_pickle: bool = False,
    endpoint: str | None = None,
    token: str | bool | None = None,
    listing: tuple[str, list[str]] | None = None,
) -> tuple[Path, str]:
    """(local path, commit) of a Hub model for an extraction: a snapshot folder holding only
    the files it reads, or one single-file checkpoint (``owner/name:file.safetensors``)."""
    from huggingface_hub import hf_hub_download, snapshot_download

    repo_id, _, file = ref.partition(":")
    commit, names = listing or hub_listing(repo_id, revision, endpoint, token)
    if file:
        check_repo_path(file, ref)
        with hub_errors(ref, endpoint):
            return Path(hf_hub_download(repo_id, file, revision=commit, endpoint=endpoint, token=token)), commit
    parts = model_parts(names) & (components if components is not None else set(COMPONENTS))
    if not parts:
        raise ModelError(
            f"{ref}@{revision or 'main'}: no diffusers model folders ({', '.join(COMPONENTS)}) in the repo; "
            "for a single-file checkpoint in it, write owner/name:FILE.safetensors"
        )
    wanted = files_to_fetch(names, parts, allow_pickle=allow_pickle, label=f"{ref}@{revision or 'main'}")
    log.info("downloading %d files of %s@%s: %s", len(wanted), repo_id, commit[:10], ", ".join(wanted))
    with hub_errors(f"{ref}@{revision or 'main'}", endpoint):
        folder = snapshot_download(repo_id, revision=commit, allow_patterns=wanted, endpoint=endpoint, token=token)
    return Path(folder), commit


def extract_models(
    model: str,
    base: str,
    *,
    revision: str | None = None,
    base_revision: str | None = None,
    rank: str | int = "auto",
    components: list[str] | None = None,
    allow_pickle: bool = False,
    endpoint: str | None = None,
    token: str | bool | None = None,
    progress=None,
) -> Extraction:
    """``selma_toolkit.lora.extract.extract_lora`` for references that may be Hub ids: each is
    downloaded (only the model parts both have) and recorded with its revision and commit."""
    wanted = set(components) if components else None
    listings = {
        ref: hub_listing(ref.partition(":")[0], rev, endpoint, token) if is_hub_model(ref) else None
        for ref, rev in ((model, revision), (base, base_revision))
    }
    folder_parts = [model_parts(listing[1]) for ref, listing in listings.items() if listing and ":" not in ref]
    if len(folder_parts) == 2:  # download only what both have
        shared = folder_parts[0] & folder_parts[1]
        wanted = shared & wanted if wanted is not None else shared
    paths, sources = [], []
    for ref, rev in ((model, revision), (base, base_revision)):
        if listings[ref] is None:
            if rev:
                raise ModelError(
                    what="applies to Hub models only",
                    where=(ref, Option("revision")),
                    found=rev,
                    remedies=[Remedy.unset("revision")],
                )
            paths.append(Path(ref).expanduser())
            sources.append(Source(ref))
            continue
        path, commit = fetch_model(
            ref, rev, wanted, allow_pickle=allow_pickle, endpoint=endpoint, token=token, listing=listings[ref]
        )
        paths.append(path)
        sources.append(Source(ref, revision=rev or "main", commit=commit))
    return extract_lora(
        paths[0],
        paths[1],
        rank=rank,
        components=components,
        allow_pickle=allow_pickle,
        model_source=sources[0],
        base_source=sources[1],
        progress=progress,
    )


# -------------------------------------------------------------------------- catalog extractions


def extraction_cache() -> Path:
    """Where catalog extractions are kept: ``$SELMA_CACHE/extractions`` (default ~/.cache/selma)."""
    return cache_dir() / "extractions"


def _settings(entry: CatalogEntry) -> dict:
    spec = entry.extract
    assert spec is not None
    return {
        "model": spec.model,
        "base": spec.base,
        "rank": spec.rank,
        "components": sorted(spec.components) if spec.components else None,
    }


def pull_extraction(
    entry: CatalogEntry,
    *,
    revision: str | None = None,
    to: str | Path | None = None,
    endpoint: str | None = None,
    token: str | bool | None = None,
    cached_only: bool = False,
    progress=None,
) -> Path:
    """The LoRA of an ``extract`` catalog entry as a local file: from the cache when an
    extraction of the same two commits and settings is there, else downloaded and extracted
    (never with ``cached_only``: then a missing extraction is an error giving the command that
    makes it). ``revision`` overrides the entry's model revision; ``to`` copies the file into a
    folder as ``<name>.safetensors``."""
    spec = entry.extract
    assert spec is not None, f"{entry.name} is not an extract entry"
    model_revision = revision or spec.model_revision
    if cached_only:
        path = cached_extraction(entry, model_revision)
        if path is None:
            raise HubError(
                what=f"this catalog entry is extracted from two full models ({spec.model} minus {spec.base}, several "
                "GB each), which is not done inside a graph",
                where=entry.name,
                remedies=[
                    Remedy.run(
                        f"selma hub pull {entry.name}",
                        note=f"once, in a terminal: it downloads both, "
                        f"extracts the LoRA and keeps it in {extraction_cache()}; then run this again",
                    )
                ],
            )
    else:
        commits = {
            "model_commit": resolve_commit(spec.model, model_revision, endpoint, token),
            "base_commit": resolve_commit(spec.base, spec.base_revision, endpoint, token),
        }
        settings = {**_settings(entry), **commits, "version": EXTRACTION_VERSION}
        key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        folder = extraction_cache() / entry.name / key
        path = folder / f"{entry.name}.safetensors"
        if path.is_file():
            log.info(
                "%s: extraction of %s@%s - %s@%s taken from the cache (%s)",
                entry.name,
                spec.model,
                commits["model_commit"][:10],
                spec.base,
                commits["base_commit"][:10],
                path,
            )
        else:
            extraction = extract_models(
                spec.model,
                spec.base,
                revision=commits["model_commit"],
                base_revision=commits["base_commit"],
                rank=spec.rank,
                components=list(spec.components) if spec.components else None,
                endpoint=endpoint,
                token=token,
                progress=progress,
            )
            extraction.model.revision, extraction.base.revision = model_revision or "main", spec.base_revision or "main"
            extraction.weights.metadata = extraction_metadata(extraction)
            save_extraction(extraction, path)
            record = {
                **settings,
                "entry": entry.name,
                "model_revision": model_revision,
                "base_revision": spec.base_revision,
                "summary": extraction.summary(),
            }
            atomic_write_text(folder / "record.json", json.dumps(record, indent=2, sort_keys=True) + "\n")
    if to is None:
        return path
    target = Path(to).expanduser() / f"{entry.name}.safetensors"
    with open(path, "rb") as src, atomic_open(target) as dst:
        shutil.copyfileobj(src, dst)
    return target


def cached_extraction(entry: CatalogEntry, model_revision: str | None = None) -> Path | None:
    """The newest cached extraction of ``entry`` with its current settings (and its pinned
    revisions, when the entry or ``model_revision`` pins them), or None; reads no network."""
    spec = entry.extract
    assert spec is not None
    wanted = {**_settings(entry), "version": EXTRACTION_VERSION}
    found: list[tuple[float, Path]] = []
    for record_file in (extraction_cache() / entry.name).glob("*/record.json"):
        try:
            record = json.loads(record_file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if any(record.get(key) != value for key, value in wanted.items()):
            continue
        if not _revision_matches(record, "model", model_revision) or not _revision_matches(
            record, "base", spec.base_revision
        ):
            continue
        lora = record_file.parent / f"{entry.name}.safetensors"
        if lora.is_file():
            found.append((lora.stat().st_mtime, lora))
    return max(found)[1] if found else None


def _revision_matches(record: dict, role: str, revision: str | None) -> bool:
    if revision is None:
        return True
    return revision in (record.get(f"{role}_commit"), record.get(f"{role}_revision"))
