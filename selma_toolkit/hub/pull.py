"""Pulling experts: a catalog name or repo id -> a verified local .safetensors file (through the
Hugging Face cache, so HF_HUB_OFFLINE=1 works from it; the catalog's sha256 checked)."""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from selma_toolkit.errors import HubError, HubInputError, LoraFormatError, Remedy
from selma_toolkit.hub.catalog import load_catalog
from selma_toolkit.hub.connection import hub_errors
from selma_toolkit.hub.names import (
    PICKLE_SUFFIXES,
    REPO_ID,
    check_repo_id,
    check_repo_path,
    check_safetensors_name,
)
from selma_toolkit.io import atomic_open, sha256_file

log = logging.getLogger(__name__)


def _list_repo_files(repo_id: str, revision: str | None, endpoint: str | None, token: str | bool | None) -> list[str]:
    from huggingface_hub import HfApi, is_offline_mode, snapshot_download

    what = f"{repo_id}@{revision or 'main'}"
    with hub_errors(what, endpoint):
        if is_offline_mode():
            # No listing without a server: use what an earlier pull left in the cache.
            folder = Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
            return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        # An explicit revision: olah-style mirrors answer model_info only with one.
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision or "main", token=token)
    return [sibling.rfilename for sibling in info.siblings or []]


def _choose_expert_file(repo_id: str, revision: str | None, endpoint: str | None, token: str | bool | None) -> str:
    names = _list_repo_files(repo_id, revision, endpoint, token)
    for name in names:
        check_repo_path(name, f"{repo_id}: file listed by the server")
    candidates = [n for n in names if n.lower().endswith(".safetensors")]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        pickles = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES)]
        found = (
            f"only pickle weight files ({', '.join(pickles[:5])}: loading one can run arbitrary code)"
            if pickles
            else "no .safetensors file"
        )
        raise HubError(
            f"{repo_id}@{revision or 'main'}: found {found}; selma-toolkit accepts LoRA experts only as .safetensors"
        )
    shown = ", ".join(candidates[:10]) + (", ..." if len(candidates) > 10 else "")
    raise HubError(
        what=f"holds {len(candidates)} .safetensors files ({shown})",
        where=f"{repo_id}@{revision or 'main'}",
        remedies=[Remedy.do(f"name one as {repo_id}:FILE"), Remedy.give("filename")],
    )


def _remove_downloaded(path: Path) -> None:
    """Delete a downloaded file: the cache's snapshot link and the blob it points to."""
    blob = path.resolve()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    if blob != path:
        with contextlib.suppress(FileNotFoundError):
            blob.unlink()


def _check_safetensors_file(path: Path, source: str) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            handle.keys()
    except Exception as exc:
        _remove_downloaded(path)
        raise HubError(
            f"{source}: the downloaded file is not a valid .safetensors file ({exc}); it was removed"
        ) from None


def pull_file(
    repo_id: str,
    filename: str,
    *,
    revision: str | None = None,
    sha256: str | None = None,
    to: str | Path | None = None,
    endpoint: str | None = None,
    token: str | bool | None = None,
) -> Path:
    """Download one ``.safetensors`` file through the Hugging Face cache; verify it; optionally copy it to ``to``.

    Returns the file in ``to`` when given, else the cached file.
    """
    from huggingface_hub import hf_hub_download

    check_repo_id(repo_id)
    source = f"{repo_id}:{filename}@{revision or 'main'}"
    check_safetensors_name(check_repo_path(filename, source), source)
    with hub_errors(source, endpoint):
        path = Path(hf_hub_download(repo_id, filename, revision=revision, endpoint=endpoint, token=token))
    if sha256 is not None:
        actual = sha256_file(path)
        if actual != sha256:
            _remove_downloaded(path)
            raise HubError(
                f"{source}: sha256 of the download is {actual}, the catalog expects {sha256}; the file was removed. "
                "The repo changed since the catalog entry was written, or the download was tampered with: "
                "pin the entry's revision or update its sha256 only after checking the file"
            )
    _check_safetensors_file(path, source)
    if to is None:
        return path
    # A plain copy, not hf_hub_download(local_dir=...): that would add its .cache/ bookkeeping folder to
    # the target (e.g. ComfyUI's models/loras), and sub-folders for nested repo paths.
    target = Path(to).expanduser() / PurePosixPath(filename).name
    with open(path, "rb") as src, atomic_open(target) as dst:
        shutil.copyfileobj(src, dst)
    return target


def cached_file(repo_id: str, filename: str, revision: str | None = None) -> Path | None:
    """The file as an earlier pull left it in the local Hugging Face cache, or None; no network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, revision=revision)
    return Path(found) if isinstance(found, str) else None  # None or a "known missing" marker


def _looks_like_local_path(text: str) -> bool:
    return (
        text.startswith((".", "/", "~"))
        or "\\" in text
        or text.count("/") > 1
        or text.lower().endswith((".safetensors", *PICKLE_SUFFIXES))
    )


def resolve_expert(
    ref: str | Path,
    *,
    catalog: str | Path | Sequence[str | Path] | None = None,
    revision: str | None = None,
    to: str | Path | None = None,
    filename: str | None = None,
    endpoint: str | None = None,
    token: str | bool | None = None,
    cached_only: bool = False,
) -> Path:
    """A local ``.safetensors`` path for an expert reference.

    ``ref`` is a local file (returned as is), a catalog name (``countbench``), a repo id
    ``owner/name`` or ``owner/name:path/in/repo.safetensors``. ``catalog`` adds user catalog files;
    ``revision`` picks a branch, tag or commit (default: the catalog's pin, else main); ``to`` copies
    the downloaded file into a folder; ``filename`` names the file in a repo with several;
    ``endpoint`` and ``token`` are passed to huggingface_hub (default: HF_ENDPOINT, the stored login).
    A catalog ``extract`` entry is extracted from its two models on first use and then taken from
    the extraction cache (``hub.extraction``); with ``cached_only`` only from the cache.
    """
    text = str(ref)
    local = Path(text).expanduser()
    if local.is_file():
        if local.suffix.lower() != ".safetensors":
            check_safetensors_name(local.name, str(local))
        return local
    if local.is_dir():
        raise LoraFormatError(
            f"{text}: is a folder; expected a .safetensors LoRA file, a catalog name or a repo id owner/name"
        )
    repo_id, _, in_ref = text.partition(":")
    if "/" not in repo_id and not in_ref and not _looks_like_local_path(text):
        entries = load_catalog(catalog)
        entry = entries.get(text)
        if entry is None:
            known = f"catalog names: {', '.join(sorted(entries))}" if entries else "the catalog is empty"
            raise HubInputError(
                what=f"no such file, and no catalog entry of that name ({known}); a Hub repo is written owner/name",
                where=repr(text),
                remedies=[Remedy.give("catalog", noun="a catalog file with your own entries")],
            )
        if entry.extract is not None:
            from selma_toolkit.hub.extraction import pull_extraction

            return pull_extraction(
                entry, revision=revision, to=to, endpoint=endpoint, token=token, cached_only=cached_only
            )
        log.info("catalog %s -> %s:%s", entry.name, entry.repo, entry.file)
        return pull_file(
            entry.repo,
            entry.file,
            revision=revision or entry.revision,
            sha256=entry.sha256,
            to=to,
            endpoint=endpoint,
            token=token,
        )
    if _looks_like_local_path(repo_id) or not REPO_ID.match(repo_id):
        raise HubInputError(
            f"{text}: no such file; an expert is a .safetensors file, a catalog name, or a Hub repo id owner/name"
        )
    check_repo_id(repo_id)
    file = filename or in_ref or _choose_expert_file(repo_id, revision, endpoint, token)
    return pull_file(repo_id, file, revision=revision, to=to, endpoint=endpoint, token=token)
