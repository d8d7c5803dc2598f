"""``selma comfyui install COMFYUI_DIR``: put the node pack into a ComfyUI for people who installed the
toolkit with pip.

The pack is copied, not linked to this Python environment: ComfyUI usually runs in its own
environment (with its own torch build), and the copy is the same folder a ``git clone`` gives,
``custom_nodes/selma-toolkit/`` with the two packages, the one-line ``__init__.py`` ComfyUI loads,
``requirements.txt`` for ComfyUI-Manager and the UI-format example workflow in
``example_workflows/`` (ComfyUI's template browser lists it). Re-running it updates a folder it
wrote (a marker file tells), and never touches one it did not write, such as a git clone. The copy
gets the modes of the user's umask (not mkdtemp's 0700), so another user's ComfyUI can read it; a
ComfyUI checkout that ComfyUI does not use as its base folder (``--base-directory`` elsewhere) is
refused or warned about, since ComfyUI would never load the copy.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from selma_toolkit.errors import InputError, OutputError

logger = logging.getLogger(__name__)

PACK_FOLDER = "selma-toolkit"
MARKER = ".selma-comfyui-install"
# The file ComfyUI imports: the same as the repository root's __init__.py (a test keeps them equal).
ROOT_INIT = '''"""ComfyUI loads this file when the repository is cloned into ComfyUI/custom_nodes/: the SELMA node pack
(comfyui_nodes/), with selma_toolkit/ beside it. See docs/comfyui.md."""

# Only as a package: pytest, run in a clone whose folder name is not a Python name (selma-toolkit),
# imports this file on its own while collecting, where a relative import cannot work.
if __package__:
    from .comfyui_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
'''
# The repository's requirements.txt, without torch (it would replace the user's CUDA build).
REQUIREMENTS = ["safetensors>=0.4", "huggingface_hub>=0.34"]
UI_WORKFLOW = "selma-merge-experts.json"
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")


def install_node_pack(comfyui_dir: str | os.PathLike[str], folder_name: str = PACK_FOLDER) -> Path:
    """Copy the node pack into ``comfyui_dir/custom_nodes/<folder_name>``; return that folder.

    Raises :class:`~selma_toolkit.errors.InputError` when ``comfyui_dir`` has no ``custom_nodes`` folder, or when the
    target exists and was not written by this function (a git clone is updated with ``git pull``).
    The new folder is assembled beside the target and swapped in, so a failed copy leaves the old one;
    its folders and files get the modes the user's umask gives new ones (0755 / 0644 under umask 022),
    so a ComfyUI run by another user can read it. :func:`base_directory_note` says when ComfyUI may
    look elsewhere (``--base-directory``).
    """
    import selma_toolkit
    from selma_toolkit.resources import shipped_dir

    comfyui_dir = Path(comfyui_dir).expanduser()
    custom_nodes = comfyui_dir / "custom_nodes"
    if not custom_nodes.is_dir():
        raise InputError(_no_custom_nodes(comfyui_dir))
    target = custom_nodes / folder_name
    if (target.exists() or target.is_symlink()) and not (target / MARKER).is_file():
        raise OutputError(
            f"{target} exists and was not written by `selma comfyui install` (a git clone or a link?); update a clone "
            "with `git pull` in it, or move the folder away and run the command again"
        )
    # ".disabled": ComfyUI skips such folders should a crash leave this one behind.
    staging = Path(tempfile.mkdtemp(prefix=f".{folder_name}-", suffix=".disabled", dir=custom_nodes))
    try:
        toolkit = Path(selma_toolkit.__file__).resolve().parent
        shutil.copytree(toolkit, staging / "selma_toolkit", ignore=_IGNORE)
        shipped = staging / "selma_toolkit" / "_shipped"
        for name in ("recipes", "hub"):
            if not (shipped / name).is_dir():  # an editable checkout keeps them at the repository root
                shutil.copytree(shipped_dir(name), shipped / name, ignore=_IGNORE)
        pack = Path(__file__).resolve().parent
        shutil.copytree(pack, staging / "comfyui_nodes", ignore=_IGNORE)
        (staging / "example_workflows").mkdir()
        shutil.copy2(pack / "workflows" / UI_WORKFLOW, staging / "example_workflows" / UI_WORKFLOW)
        (staging / "__init__.py").write_text(ROOT_INIT)
        (staging / "requirements.txt").write_text("\n".join(REQUIREMENTS) + "\n")
        (staging / MARKER).write_text(f"selma-toolkit {selma_toolkit.__version__}\n")
        apply_umask(staging)  # mkdtemp made it 0700 and copytree copied the source's modes
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{folder_name}-old-", suffix=".disabled", dir=custom_nodes))
            os.replace(target, old / folder_name)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    logger.info("installed the SELMA node pack %s into %s", selma_toolkit.__version__, target)
    return target


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path, mask: int | None = None) -> None:
    """Give ``root`` and everything in it the modes a new folder or file gets under ``mask`` (default:
    the current umask): 0777 & ~mask for folders and executables, 0666 & ~mask for other files."""
    mask = current_umask() if mask is None else mask
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            mode = 0o777 if os.lstat(path).st_mode & 0o111 else 0o666
            os.chmod(path, mode & ~mask)


def _is_checkout(folder: Path) -> bool:
    """A ComfyUI program folder (git clone, portable build): main.py beside the comfy package."""
    return (folder / "main.py").is_file() and (folder / "comfy").is_dir()


def _no_custom_nodes(comfyui_dir: Path) -> str:
    if _is_checkout(comfyui_dir):
        return (
            f"{comfyui_dir}: a ComfyUI checkout without a custom_nodes folder. If you start ComfyUI with "
            "--base-directory DIR, it loads custom nodes from DIR/custom_nodes: run `selma comfyui install DIR`; "
            f"otherwise create {comfyui_dir / 'custom_nodes'} and run this again"
        )
    if any((comfyui_dir / name).is_dir() for name in ("models", "user", "output")):
        return (
            f"{comfyui_dir}: no custom_nodes folder. If this is the folder you give ComfyUI's --base-directory, "
            f"create {comfyui_dir / 'custom_nodes'} (ComfyUI loads custom nodes from there) and run this again"
        )
    return (
        f"{comfyui_dir}: no custom_nodes folder; expected the ComfyUI folder that holds main.py and custom_nodes/ "
        "(in the Windows portable build: ComfyUI_windows_portable/ComfyUI), or the folder you give ComfyUI's "
        "--base-directory"
    )


def base_directory_note(comfyui_dir: str | os.PathLike[str]) -> str | None:
    """A warning when ComfyUI may not load packs from ``comfyui_dir/custom_nodes``: the folder is a
    ComfyUI checkout that ComfyUI never started with as its base (no ``user/`` folder, which ComfyUI
    creates in its base directory at start-up), as when it runs with ``--base-directory`` elsewhere."""
    comfyui_dir = Path(comfyui_dir).expanduser()
    if not _is_checkout(comfyui_dir) or (comfyui_dir / "user").exists():
        return None
    return (
        f"{comfyui_dir} is a ComfyUI checkout that ComfyUI has not used as its base folder yet (it has no user/ "
        "folder). If you start ComfyUI with --base-directory DIR, it loads custom nodes from DIR/custom_nodes and "
        "ignores this copy: run `selma comfyui install DIR` instead"
    )
