"""Names that come from users, catalogs and servers, checked before any request or write:
repo ids, file paths inside a repo, and the .safetensors-only rule."""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from selma_toolkit.errors import HubInputError

LOGIN_HINT = (
    "log in with `hf auth login` (or the older `huggingface-cli login`), or set the HF_TOKEN environment "
    "variable to a token with write access (https://huggingface.co/settings/tokens)"
)
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_-])?"
REPO_ID = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")


def check_repo_id(repo_id: str) -> str:
    """Return ``repo_id`` if it is a Hub model repo id ``owner/name``, else raise HubError."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    expected = "owner/name (letters, digits, '-', '_', '.'), e.g. my-user/countbench-sd2"
    if not REPO_ID.match(repo_id):
        raise HubInputError(what="not a valid repo id", where=f"repo id {repo_id!r}", expected=expected)
    try:  # the client's own rules on top of the shape (no '--' or '..', at most 96 characters)
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise HubInputError(
            what=f"not a valid repo id ({exc})", where=f"repo id {repo_id!r}", expected=expected
        ) from None
    return repo_id


def check_repo_path(name: str, source: str) -> str:
    """Return ``name`` if it is a safe relative POSIX path inside a repo; refuse ``..``, absolute
    paths and backslashes (a server or catalog could otherwise make us write outside the target)."""
    parts = PurePosixPath(name).parts
    absolute = name.startswith(("/", "~")) or re.match(r"^[A-Za-z]:", name) is not None
    if not parts or absolute or "\\" in name or ".." in parts:
        raise HubInputError(
            what=f"refusing file name {name!r}: from a command line, a catalog or a server, it could write outside the "
            "target folder",
            where=source,
            expected="a relative path inside the repo without '..'",
        )
    return name


def check_safetensors_name(name: str, source: str) -> str:
    """Refuse anything but ``.safetensors``, naming why."""
    if not name.lower().endswith(".safetensors"):
        why = " (a pickle file: loading one can run arbitrary code)" if name.lower().endswith(PICKLE_SUFFIXES) else ""
        raise HubInputError(
            what=f"not a .safetensors file{why}",
            where=(source, repr(name)),
            expected="a .safetensors file (selma-toolkit accepts LoRA experts only as .safetensors)",
        )
    return name
