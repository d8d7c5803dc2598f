"""ComfyUI loads this file when the repository is cloned into ComfyUI/custom_nodes/: the SELMA node pack
(comfyui_nodes/), with selma_toolkit/ beside it. See docs/comfyui.md."""

from .comfyui_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
