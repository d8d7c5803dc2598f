"""Stage 2: draw one image per prompt into a skill's image dataset (imagefolder + metadata.jsonl).

Importing this package is light: its names are imported on first use (selma_toolkit/lazy.py);
torch, diffusers and accelerate are imported when images are drawn.
"""

from selma_toolkit.lazy import lazy_exports

_EXPORTS = {
    "generate": ("ImageStats", "check_image_inputs", "generate_images", "image_name", "image_seed"),
    "shard": ("process_state",),
}
__all__ = ["ImageStats", "check_image_inputs", "generate_images", "image_name", "image_seed", "process_state"]
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
