"""Stage 2: draw one image per prompt into a skill's image dataset (imagefolder + metadata.jsonl).

Importing this package is light: torch, diffusers and accelerate are imported when images are drawn.
"""

from selma_toolkit.images.generate import ImageStats, check_image_inputs, generate_images
from selma_toolkit.images.naming import image_name, image_seed
from selma_toolkit.images.shard import process_state

__all__ = ["ImageStats", "check_image_inputs", "generate_images", "image_name", "image_seed", "process_state"]
