"""Hugging Face Hub: pull experts by catalog name or repo id, push experts and runs with a model card.

* ``resolve_expert(ref)`` turns what a user writes for an expert into a local ``.safetensors`` path:
  a local file (returned as is), a catalog name (``countbench``: ``hub/catalog.toml`` plus the
  user's ``--catalog`` files) or a repo id ``owner/name`` (optionally ``owner/name:path/in/repo``).
  Downloads go through ``hf_hub_download`` into the standard Hugging Face cache, so
  ``HF_HUB_OFFLINE=1`` works from the cache; the catalog's sha256 is checked when it has one.
* ``push_expert(path, repo_id)`` uploads an expert file, a merged LoRA or a whole run folder with a
  generated model card (``selma_toolkit.hub.card``) in one commit.

Security: repo ids must be ``owner/name``; file names from a server or a catalog must be relative
paths without ``..``; only ``.safetensors`` files are accepted (the others are pickles that can run
code when loaded); a file whose sha256 differs from the catalog's is deleted; the token is passed
to huggingface_hub only and never printed, logged or written.
"""

from __future__ import annotations

from selma_toolkit.hub.catalog import (
    CATALOG_ENV,
    CatalogEntry,
    load_catalog,
    read_catalog,
)
from selma_toolkit.hub.names import (
    LOGIN_HINT,
    PICKLE_SUFFIXES,
    REPO_ID,
    check_repo_id,
    check_repo_path,
    check_safetensors_name,
)
from selma_toolkit.hub.pull import cached_file, pull_file, resolve_expert
from selma_toolkit.hub.push import push_expert

__all__ = [
    "CATALOG_ENV",
    "LOGIN_HINT",
    "PICKLE_SUFFIXES",
    "REPO_ID",
    "CatalogEntry",
    "cached_file",
    "check_repo_id",
    "check_repo_path",
    "check_safetensors_name",
    "load_catalog",
    "pull_file",
    "push_expert",
    "read_catalog",
    "resolve_expert",
]
