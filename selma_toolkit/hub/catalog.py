"""The catalog of published experts: ``hub/catalog.toml`` (shipped) plus the user's files
(``--catalog``, ``SELMA_CATALOG``), each entry checked: repo id, file name, family, sha256.

Two kinds of entries: a LoRA file in a Hub repo (``repo`` + ``file``), or a LoRA extracted from
two full models (``extract = { model = "...", base = "..." }``: the fine-tuned model minus the base
it was trained from, made by ``selma_toolkit.hub.extraction``)."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selma_toolkit.architectures import FAMILIES, FAMILY_NAMES
from selma_toolkit.errors import HubError, HubInputError
from selma_toolkit.hub.names import (
    check_repo_id,
    check_repo_path,
    check_safetensors_name,
)
from selma_toolkit.resources import shipped_dir

CATALOG_ENV = "SELMA_CATALOG"
_CATALOG_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class ExtractSpec:
    """How an ``extract`` entry's LoRA is made: ``model`` minus ``base`` (Hub repo ids, optionally
    pinned to revisions), at ``rank`` ("auto" or N), over ``components`` (default: every part both have)."""

    model: str
    base: str
    model_revision: str | None = None
    base_revision: str | None = None
    rank: str | int = "auto"
    components: tuple[str, ...] | None = None


@dataclass(frozen=True)
class CatalogEntry:
    """One published expert: where it lives and what it is. For an ``extract`` entry, ``repo``
    is the fine-tuned model, ``file`` the name the extracted LoRA gets and ``extract`` the recipe."""

    name: str
    repo: str
    file: str
    skill: str
    base_model: str
    architecture: str  # a family name (architectures.FAMILY_NAMES), as the catalog file writes it
    sha256: str | None = None
    revision: str | None = None
    source: str = ""
    extract: ExtractSpec | None = None

    @property
    def kind(self) -> str:
        """ "file" (a LoRA file in a repo) or "extract" (a LoRA extracted from two models)."""
        return "extract" if self.extract is not None else "file"


_REQUIRED = ("repo", "file", "skill", "base_model", "architecture")
_OPTIONAL = ("sha256", "revision")
_EXTRACT_KEYS = ("extract", "architecture", "skill", "base_model")
_EXTRACT_SPEC_REQUIRED = ("model", "base")
_EXTRACT_SPEC_OPTIONAL = ("model_revision", "base_revision", "rank", "components")


def _catalog_entry(name: str, table: Any, source: str) -> CatalogEntry:
    where = f"{source}: [{name}]"
    if not _CATALOG_NAME.match(name):
        raise HubError(
            f"{where}: entry name must be lower-case letters, digits, '-', '_' or '.' (no '/'; that would read as a repo id)"
        )
    if not isinstance(table, dict):
        raise HubError(f"{where}: expected a table with keys {', '.join(_REQUIRED)}, found {table!r}")
    if "extract" in table:
        return _extract_entry(name, table, source, where)
    unknown = sorted(set(table) - set(_REQUIRED) - set(_OPTIONAL))
    missing = [key for key in _REQUIRED if key not in table]
    if unknown or missing:
        raise HubError(
            f"{where}: "
            + "; ".join(
                ([f"unknown key(s) {unknown}"] if unknown else []) + ([f"missing key(s) {missing}"] if missing else [])
            )
            + f"; valid keys: {', '.join(_REQUIRED + _OPTIONAL)}"
        )
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


def _extract_entry(name: str, table: dict[str, Any], source: str, where: str) -> CatalogEntry:
    """An ``extract`` entry: ``extract = { model, base[, model_revision, base_revision, rank,
    components] }``, ``architecture``, optional ``skill`` and ``base_model`` (default: the base)."""
    unknown = sorted(set(table) - set(_EXTRACT_KEYS))
    if unknown or "architecture" not in table:
        raise HubError(
            f"{where}: an extract entry takes the keys {', '.join(_EXTRACT_KEYS)} (architecture required)"
            + (f"; found unknown key(s) {unknown}" if unknown else "")
        )
    spec = table["extract"]
    allowed = set(_EXTRACT_SPEC_REQUIRED + _EXTRACT_SPEC_OPTIONAL)
    if not isinstance(spec, dict) or set(_EXTRACT_SPEC_REQUIRED) - set(spec) or set(spec) - allowed:
        raise HubError(
            f"{where}: extract = {spec!r}: expected a table with model and base (Hub repo ids) and "
            f"optionally {', '.join(_EXTRACT_SPEC_OPTIONAL)}"
        )
    strings = [
        k for k in ("model", "base", "model_revision", "base_revision") if k in spec and not isinstance(spec[k], str)
    ]
    strings += [k for k in ("architecture", "skill", "base_model") if k in table and not isinstance(table[k], str)]
    if strings:
        raise HubError(f"{where}: {', '.join(strings)}: expected strings")
    rank = spec.get("rank", "auto")
    if rank != "auto" and not (isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1):
        raise HubError(f'{where}: extract.rank {rank!r}: expected "auto" or a positive integer')
    if table["architecture"] not in FAMILIES:
        raise HubError(f"{where}: architecture {table['architecture']!r}: expected one of {', '.join(FAMILY_NAMES)}")
    parts = FAMILIES[table["architecture"]].components
    components = spec.get("components")
    if components is not None and (
        not isinstance(components, list)
        or not components
        or not all(isinstance(c, str) and c in parts for c in components)
    ):
        raise HubError(
            f"{where}: extract.components {components!r}: expected a list of model parts of "
            f"{table['architecture']}: {', '.join(parts)}"
        )
    try:
        check_repo_id(spec["model"])
        check_repo_id(spec["base"])
    except HubError as exc:
        raise HubError(f"{where}: extract: {exc}") from None
    extract = ExtractSpec(
        spec["model"],
        spec["base"],
        spec.get("model_revision"),
        spec.get("base_revision"),
        rank,
        tuple(components) if components else None,
    )
    return CatalogEntry(
        name=name,
        repo=extract.model,
        file=f"{name}.safetensors",
        skill=table.get("skill", ""),
        base_model=table.get("base_model", extract.base),
        architecture=table["architecture"],
        revision=extract.model_revision,
        source=source,
        extract=extract,
    )


def read_catalog(path: str | Path) -> dict[str, CatalogEntry]:
    """Read one catalog file: a TOML table per entry, ``[name]`` with repo, file, skill,
    base_model, architecture and optional sha256 and revision; or an ``extract`` entry."""
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
