"""ComfyUI loads this file when the repository is cloned into ComfyUI/custom_nodes/: the SELMA node pack
(comfyui_nodes/), with selma_toolkit/ beside it. It exports what the pack exports for the running ComfyUI:
comfy_entrypoint (V3 nodes) or NODE_CLASS_MAPPINGS (classic nodes), and WEB_DIRECTORY. See docs/comfyui.md."""

# Only as a package: pytest, run in a clone whose folder name is not a Python name (selma-toolkit),
# imports this file on its own while collecting, where a relative import cannot work.
if __package__:
    from .comfyui_nodes import *  # noqa: F403 - exactly the names in the pack's __all__
    from .comfyui_nodes import __all__  # noqa: F401
