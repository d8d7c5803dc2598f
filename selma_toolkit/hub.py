"""Hugging Face Hub: pull experts by catalog name or repo id, push experts and runs with a model card.

* ``resolve_expert(ref)`` turns what a user writes for an expert into a local ``.safetensors`` path:
  a local file (returned as is), a catalog name (``countbench``: ``hub/catalog.toml`` plus the
  user's ``--catalog`` files) or a repo id ``owner/name`` (optionally ``owner/name:path/in/repo``).
  Downloads go through ``hf_hub_download`` into the standard Hugging Face cache, so
  ``HF_HUB_OFFLINE=1`` works from the cache; the catalog's sha256 is checked when it has one.
* ``push_expert(path, repo_id)`` uploads an expert file, a merged LoRA or a whole run folder with a
  generated model card (``selma_toolkit.hubcard``) in one commit.

Security: repo ids must be ``owner/name``; file names from a server or a catalog must be relative
paths without ``..``; only ``.safetensors`` files are accepted (the others are pickles that can run
code when loaded); a file whose sha256 differs from the catalog's is deleted; the token is passed
to huggingface_hub only and never printed, logged or written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from selma_toolkit.architectures import FAMILIES, FAMILY_NAMES
from selma_toolkit.errors import HubError, HubInputError, LoraFormatError
from selma_toolkit.io import atomic_open, sha256_file

log = logging.getLogger(__name__)

LOGIN_HINT = (
    "log in with `hf auth login` (or the older `huggingface-cli login`), or set the HF_TOKEN environment "
    "variable to a token with write access (https://huggingface.co/settings/tokens)"
)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
CATALOG_ENV = "SELMA_CATALOG"
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_-])?"
_REPO_ID = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")
_CATALOG_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
Architecture = str  # a family name of selma_toolkit.architectures


# ------------------------------------------------------------------------------------- checks


def check_repo_id(repo_id: str) -> str:
    """Return ``repo_id`` if it is a Hub model repo id ``owner/name``, else raise HubError."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    problem = None
    if not _REPO_ID.match(repo_id):
        problem = "expected owner/name (letters, digits, '-', '_', '.'), e.g. my-user/countbench-sd2"
    else:
        try:  # the client's own rules on top of the shape (no '--' or '..', at most 96 characters)
            validate_repo_id(repo_id)
        except HFValidationError as exc:
            problem = str(exc)
    if problem:
        raise HubInputError(f"repo id {repo_id!r} is not valid: {problem}")
    return repo_id


def check_repo_path(name: str, source: str) -> str:
    """Return ``name`` if it is a safe relative POSIX path inside a repo; refuse ``..``, absolute
    paths and backslashes (a server or catalog could otherwise make us write outside the target)."""
    parts = PurePosixPath(name).parts
    absolute = name.startswith(("/", "~")) or re.match(r"^[A-Za-z]:", name) is not None
    if not parts or absolute or "\\" in name or ".." in parts:
        raise HubInputError(
            f"{source}: refusing file name {name!r}: expected a relative path inside the repo without '..' "
            "(such a name, from a command line, a catalog or a server, could write outside the target folder)"
        )
    return name


def check_safetensors_name(name: str, source: str) -> str:
    """Refuse anything but ``.safetensors``, naming why."""
    if not name.lower().endswith(".safetensors"):
        why = " (a pickle file: loading one can run arbitrary code)" if name.lower().endswith(PICKLE_SUFFIXES) else ""
        raise HubInputError(f"{source}: {name!r} is not a .safetensors file{why}; selma-toolkit accepts LoRA experts only as .safetensors")
    return name


# ------------------------------------------------------------------------------------ catalog


@dataclass(frozen=True)
class CatalogEntry:
    """One published expert: where it lives and what it is."""

    name: str
    repo: str
    file: str
    skill: str
    base_model: str
    architecture: Architecture
    sha256: str | None = None
    revision: str | None = None
    source: str = ""


_REQUIRED = ("repo", "file", "skill", "base_model", "architecture")
_OPTIONAL = ("sha256", "revision")


def _catalog_entry(name: str, table: Any, source: str) -> CatalogEntry:
    where = f"{source}: [{name}]"
    if not _CATALOG_NAME.match(name):
        raise HubError(f"{where}: entry name must be lower-case letters, digits, '-', '_' or '.' (no '/'; that would read as a repo id)")
    if not isinstance(table, dict):
        raise HubError(f"{where}: expected a table with keys {', '.join(_REQUIRED)}, found {table!r}")
    unknown = sorted(set(table) - set(_REQUIRED) - set(_OPTIONAL))
    missing = [key for key in _REQUIRED if key not in table]
    if unknown or missing:
        raise HubError(f"{where}: " + "; ".join(
            ([f"unknown key(s) {unknown}"] if unknown else []) + ([f"missing key(s) {missing}"] if missing else [])
        ) + f"; valid keys: {', '.join(_REQUIRED + _OPTIONAL)}")
    bad_types = [key for key, value in table.items() if not isinstance(value, str)]
    if bad_types:
        raise HubError(f"{where}: {', '.join(bad_types)}: expected strings")
    try:
        check_repo_id(table["repo"])
        check_safetensors_name(check_repo_path(table["file"], "file"), "file")  # `where` is added below, once
    except HubError as exc:
        raise HubError(f"{where}: {exc}") from None
    if table["architecture"] not in FAMILIES:
        raise HubError(f"{where}: architecture {table['architecture']!r}: expected one of {', '.join(FAMILY_NAMES)}")
    if "sha256" in table and not _SHA256.match(table["sha256"]):
        raise HubError(f"{where}: sha256 {table['sha256']!r}: expected 64 lower-case hex digits (`sha256sum FILE`)")
    return CatalogEntry(name=name, source=source, **table)


def read_catalog(path: str | Path) -> dict[str, CatalogEntry]:
    """Read one catalog file: a TOML table per entry, ``[name]`` with repo, file, skill,
    base_model, architecture and optional sha256 and revision."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise HubInputError(f"{path}: catalog file not found")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise HubInputError(f"{path}: TOML syntax error: {exc}") from None
    try:
        return {name: _catalog_entry(name, table, str(path)) for name, table in data.items()}
    except HubError as exc:  # every entry check is about the file's text: an input error (exit code 2)
        raise HubInputError(str(exc)) from None


def load_catalog(extra: str | Path | Sequence[str | Path] | None = None) -> dict[str, CatalogEntry]:
    """The shipped catalog (``hub/catalog.toml``), then the files in the ``SELMA_CATALOG``
    environment variable (separated like PATH; so every command and the diffusers / ComfyUI layers
    see them), then ``extra``; a later entry replaces an earlier one of the same name."""
    from selma_toolkit.resources import shipped_dir

    files: list[str | Path] = [shipped_dir("hub") / "catalog.toml"]
    files += [f for f in os.environ.get(CATALOG_ENV, "").split(os.pathsep) if f]
    if isinstance(extra, (str, Path)):
        files.append(extra)
    elif extra:
        files.extend(extra)
    entries: dict[str, CatalogEntry] = {}
    for file in files:
        entries.update(read_catalog(file))
    return entries


# --------------------------------------------------------------------------------------- pull


@contextlib.contextmanager
def _hub_errors(what: str, endpoint: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub / network failures into one HubError naming ``what`` and the next step
    (and, when the server cannot be reached, the endpoint: ``endpoint``, else HF_ENDPOINT's)."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except GatedRepoError:
        raise HubError(f"{what}: the repo is gated; accept its terms on the Hub, then {LOGIN_HINT}") from None
    except RepositoryNotFoundError:
        raise HubError(f"{what}: repository not found (or private: {LOGIN_HINT})") from None
    except RevisionNotFoundError:
        raise HubError(f"{what}: revision not found; check the branch, tag or commit given with --revision") from None
    except RemoteEntryNotFoundError:
        raise HubError(f"{what}: the file is not in the repo at this revision") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:
        if isinstance(exc.__cause__, _transport_errors()):  # online, but the server did not answer
            raise HubError(_unreachable(what, endpoint, exc.__cause__) + " (the file is not in the local Hugging Face cache either)") from None
        raise HubError(
            f"{what}: not in the local Hugging Face cache and the Hub cannot be reached (offline mode: "
            "HF_HUB_OFFLINE=1, or no network); pull it once while online"
        ) from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        said = f" ({exc.server_message[:200]})" if getattr(exc, "server_message", None) else ""
        hint = f"; {LOGIN_HINT}" if status in (401, 403) else ""
        raise HubError(f"{what}: the Hub answered HTTP {status}{said}{hint}") from None
    except _transport_errors() as exc:
        raise HubError(_unreachable(what, endpoint, exc)) from None


def _unreachable(what: str, endpoint: str | None, exc: BaseException) -> str:
    from huggingface_hub import constants

    where = endpoint or constants.ENDPOINT
    return f"{what}: cannot reach the Hub at {where} ({type(exc).__name__}: {exc}); check the network or HF_ENDPOINT"


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection errors of the HTTP library huggingface_hub uses (requests in older releases, httpx
    or httpx2 in newer ones); it lets them through unwrapped."""
    import importlib

    errors: list[type[BaseException]] = []
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError")):
        with contextlib.suppress(ImportError):
            errors.append(getattr(importlib.import_module(module), name))
    return tuple(errors)


def _list_repo_files(repo_id: str, revision: str | None, endpoint: str | None, token: str | bool | None) -> list[str]:
    from huggingface_hub import HfApi, is_offline_mode, snapshot_download

    what = f"{repo_id}@{revision or 'main'}"
    with _hub_errors(what, endpoint):
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
        found = f"only pickle weight files ({', '.join(pickles[:5])}: loading one can run arbitrary code)" if pickles else "no .safetensors file"
        raise HubError(f"{repo_id}@{revision or 'main'}: found {found}; selma-toolkit accepts LoRA experts only as .safetensors")
    shown = ", ".join(candidates[:10]) + (", ..." if len(candidates) > 10 else "")
    raise HubError(
        f"{repo_id}@{revision or 'main'} holds {len(candidates)} .safetensors files ({shown}); "
        f"name one as {repo_id}:FILE (or with --file FILE)"
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
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a bad header
        _remove_downloaded(path)
        raise HubError(f"{source}: the downloaded file is not a valid .safetensors file ({exc}); it was removed") from None


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
    with _hub_errors(source, endpoint):
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


def _looks_like_local_path(text: str) -> bool:
    return (
        text.startswith((".", "/", "~")) or "\\" in text or text.count("/") > 1
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
) -> Path:
    """A local ``.safetensors`` path for an expert reference.

    ``ref`` is a local file (returned as is), a catalog name (``countbench``), a repo id
    ``owner/name`` or ``owner/name:path/in/repo.safetensors``. ``catalog`` adds user catalog files;
    ``revision`` picks a branch, tag or commit (default: the catalog's pin, else main); ``to`` copies
    the downloaded file into a folder; ``filename`` names the file in a repo with several;
    ``endpoint`` and ``token`` are passed to huggingface_hub (default: HF_ENDPOINT, the stored login).
    """
    text = str(ref)
    local = Path(text).expanduser()
    if local.is_file():
        if local.suffix.lower() != ".safetensors":
            check_safetensors_name(local.name, str(local))
        return local
    if local.is_dir():
        raise LoraFormatError(f"{text}: is a folder; expected a .safetensors LoRA file, a catalog name or a repo id owner/name")
    repo_id, _, in_ref = text.partition(":")
    if "/" not in repo_id and not in_ref and not _looks_like_local_path(text):
        entries = load_catalog(catalog)
        entry = entries.get(text)
        if entry is None:
            known = f"catalog names: {', '.join(sorted(entries))}" if entries else "the catalog is empty"
            raise HubInputError(
                f"{text!r}: no such file, and no catalog entry of that name ({known}; add your own entries "
                "with --catalog FILE); a Hub repo is written owner/name"
            )
        log.info("catalog %s -> %s:%s", entry.name, entry.repo, entry.file)
        return pull_file(entry.repo, entry.file, revision=revision or entry.revision, sha256=entry.sha256,
                         to=to, endpoint=endpoint, token=token)
    if _looks_like_local_path(repo_id) or not _REPO_ID.match(repo_id):
        raise HubInputError(f"{text}: no such file; an expert is a .safetensors file, a catalog name, or a Hub repo id owner/name")
    check_repo_id(repo_id)
    file = filename or in_ref or _choose_expert_file(repo_id, revision, endpoint, token)
    return pull_file(repo_id, file, revision=revision, to=to, endpoint=endpoint, token=token)


# --------------------------------------------------------------------------------------- push


def push_expert(
    path: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Upload an expert file, a merged LoRA or a run folder to ``repo_id`` in one commit; return its URL.

    Creates the repo if needed (``private`` applies only then) and the branch ``revision`` if it does
    not exist. The commit holds the LoRA file(s), a README.md model card, and for a run the resolved
    recipe, eval/scores.json and a sample grid when present (see ``selma_toolkit.hubcard``).
    """
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    from selma_toolkit.hubcard import plan_upload

    check_repo_id(repo_id)
    plan = plan_upload(Path(path).expanduser(), repo_id)
    token = token or get_token()
    if not token:
        raise HubError(f"pushing to {repo_id} needs a Hugging Face token and none was found: {LOGIN_HINT}")
    plan.refuse_if_contains(token)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=content) for name, content in plan.files.items()]
    api = HfApi(endpoint=endpoint, token=token)
    with _hub_errors(f"push to {repo_id}", endpoint):
        api.create_repo(repo_id, private=private or None, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        info = api.create_commit(
            repo_id, operations, revision=revision,
            commit_message=commit_message or plan.commit_message, commit_description=plan.commit_description,
        )
    log.info("pushed %d files to %s (%s)", len(operations), repo_id, revision or "main")
    return str(info.commit_url)
