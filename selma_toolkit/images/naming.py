"""Seeds and file names of the images stage: a prompt's image seed, its best-of-N candidates' seeds and
its file name. Pure functions of ids, shared by the plain stage (generate.py), best-of-N (best_of.py)
and everything that pairs images with prompts."""

from __future__ import annotations

import hashlib


def image_seed(base_seed: int, prompt_id: int) -> int:
    """The seed of prompt ``prompt_id``'s image: 31 bits of sha256("<base_seed>:<prompt_id>").

    A hash rather than ``base_seed + prompt_id``, so runs with neighbouring base seeds share no noise.
    """
    digest = hashlib.sha256(f"{base_seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def image_name(prompt_id: int, image_format: str = "png") -> str:
    """File name of a prompt's image in the dataset folder (``000017.png``); its caption is
    ``image_name(id, "txt")`` (kohya's caption-file convention)."""
    return f"{prompt_id:06d}.{image_format}"


def candidate_seed(base_seed: int, prompt_id: int, candidate: int) -> int:
    """The seed of candidate ``candidate`` of a prompt: candidate 0 is ``image_seed(base_seed,
    prompt_id)`` (the plain stage's image); the others hash ``"<base_seed>:<prompt_id>:<k>"`` the same way."""
    if candidate == 0:
        return image_seed(base_seed, prompt_id)
    digest = hashlib.sha256(f"{base_seed}:{prompt_id}:{candidate}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF
