"""SELMA node pack for ComfyUI: load skill experts, merge them into one LoRA, apply it, save it.

ComfyUI loads this pack three ways, and ``selma_toolkit`` sits beside this folder in each: a
``git clone`` of the repository into ``custom_nodes/`` (the repository root's ``__init__.py``
imports this package), a folder written by ``selma comfyui install``, and a pip install
(site-packages). The copy beside the pack is imported by its location, so that the nodes always
run with the toolkit they were shipped with, and without putting the clone's root on
``sys.path`` (its ``tests/``, ``hub/`` and ``docs/`` folders would shadow other modules).

Importing the pack needs only torch and safetensors: no diffusers, peft or transformers, and no
network access (ComfyUI imports every pack at start-up).

The nodes are declared once (``nodes.py``). ComfyUI's loader registers a pack's
``NODE_CLASS_MAPPINGS`` when it has them and only otherwise calls its ``comfy_entrypoint``, so
the pack exports exactly one of the two: the V3 nodes (``v3.py``, through the pinned
``comfy_api.v0_0_2``) on a ComfyUI that has that API version, the classic classes (``v1.py``)
on any other. ``WEB_DIRECTORY`` holds the small web extension that shows a node's text output
(a merge's summary, the saved file) on the node.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

logger = logging.getLogger(__name__)


def _import_bundled_toolkit() -> None:
    """Import ``selma_toolkit`` from the folder beside this package, unless it is imported already."""
    sibling = Path(__file__).resolve().parent.parent / "selma_toolkit"
    loaded = sys.modules.get("selma_toolkit")
    if loaded is not None:
        location = Path(loaded.__file__).resolve().parent if getattr(loaded, "__file__", None) else None
        if location != sibling and (sibling / "__init__.py").is_file():
            logger.warning(
                "SELMA nodes: using selma_toolkit from %s, not the copy beside the node pack (%s)", location, sibling
            )
        return
    if not (sibling / "__init__.py").is_file():
        return  # not bundled: the ordinary import below finds an installed toolkit or names what is missing
    spec = importlib.util.spec_from_file_location(
        "selma_toolkit", sibling / "__init__.py", submodule_search_locations=[str(sibling)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["selma_toolkit"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["selma_toolkit"]
        raise


def comfy_api_version() -> str | None:
    """ "v0_0_2" when the running ComfyUI has that pinned V3 API version, else None (an older
    ComfyUI, or no ComfyUI at all: tests, CI)."""
    try:
        importlib.import_module("comfy_api.v0_0_2")
    except ImportError:
        return None
    return "v0_0_2"


_import_bundled_toolkit()
WEB_DIRECTORY = str(Path(__file__).resolve().parent / "web")  # absolute: ComfyUI joins it to the root's folder

if comfy_api_version() is not None:
    from .v3 import comfy_entrypoint  # the toolkit must be imported first

    __all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
else:
    from .v1 import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # the toolkit must be imported first

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
