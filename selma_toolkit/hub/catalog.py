"""The catalog of published experts: ``hub/catalog.toml`` (shipped) plus the user's files
(``--catalog``, ``SELMA_CATALOG``), each entry checked: repo id, file name, family, sha256."""

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
class CatalogEntry:
    """One published expert: where it lives and what it is."""

    name: str
    repo: str
    file: str
    skill: str
    base_model: str
    architecture: str  # a family name (architectures.FAMILY_NAMES), as the catalog file writes it
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
