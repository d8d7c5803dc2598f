"""ComfyUI loads this file when the repository is cloned into ComfyUI/custom_nodes/: the SELMA node pack
(comfyui_nodes/), with selma_toolkit/ beside it. See docs/comfyui.md."""

# Only as a package: pytest, run in a clone whose folder name is not a Python name (selma-toolkit),
# imports this file on its own while collecting, where a relative import cannot work.
if __package__:
    from .comfyui_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS

    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
