"""Where the shipped recipes/, hub/ and example_workflows/ folders are.

In a wheel they are package data under ``selma_toolkit/_shipped/``; in a source checkout
(editable install, tests) they are the top-level folders of the repository.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def shipped_dir(name: str) -> Path:
    """Path of a shipped top-level folder: ``"recipes"``, ``"hub"`` or ``"example_workflows"`` (the ComfyUI
    templates)."""
    for candidate in (_PACKAGE / "_shipped" / name, _PACKAGE.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"the shipped folder {name!r} is missing from this installation of selma-toolkit")


def shipped_skill(name: str) -> Path | None:
    """The shipped skill recipe called ``name`` (e.g. ``"countbench"``), or None."""
    path = shipped_dir("recipes") / "skills" / f"{name}.toml"
    return path if path.is_file() else None


def shipped_run(name: str) -> Path | None:
    """The shipped run recipe called ``name`` (e.g. ``"demo"``), or None."""
    path = shipped_dir("recipes") / "runs" / f"{name}.toml"
    return path if path.is_file() else None
