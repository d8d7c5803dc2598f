"""What an expert is trained on: the samples of one skill (or of all skills, for the mixture
baseline), how an image becomes a training tensor, and in which order samples are drawn.

The order and every random draw are pure functions of (seed, step, position), not of a sampler's
hidden state: a run resumed from a checkpoint sees exactly the batches and noise an uninterrupted
run would have seen, whatever the number of processes or the micro-batch size.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from selma_toolkit.config.recipes import RunRecipe
from selma_toolkit.dataset import read_image_dataset
from selma_toolkit.errors import DatasetError, RecipeError
from selma_toolkit.io import sha256_file
from selma_toolkit.paths import JOINT, RunPaths


@dataclass(frozen=True)
class TrainSample:
    """One image-text pair; ``source`` is the skill whose dataset it comes from."""

    image: Path
    text: str
    source: str


def training_samples(run: RunRecipe, skill: str, paths: RunPaths) -> list[TrainSample]:
    """The samples for ``skill``, or for every skill of the run in recipe order when ``skill`` is
    ``JOINT`` (the paper's mixture baseline). Dataset errors name the folder and what is wrong."""
    if skill == JOINT:
        if not run.skills:
            raise RecipeError(f"run {run.name!r}: the joint (mixture) baseline needs skills, and the run lists none")
        names = [s.name for s in run.skills]
    else:
        names = [run.skill(skill).name]
    samples: list[TrainSample] = []
    for name in names:
        samples.extend(TrainSample(record.path, record.text, name) for record in read_image_dataset(paths.images(name)))
    return samples


def image_digests(samples: list[TrainSample]) -> list[str]:
    """sha256 of every sample's image file, in order (read once, used by the caches and the
    dataset fingerprint)."""
    return [sha256_file(sample.image) for sample in samples]


def dataset_fingerprint(samples: list[TrainSample], digests: list[str]) -> str:
    """sha256 over every sample's source, text and image digest, in order: any change to the data
    (an image regenerated, a caption edited, a sample added) changes it."""
    digest = hashlib.sha256()
    for sample, image_digest in zip(samples, digests):
        digest.update(f"{sample.source}\0{sample.text}\0{image_digest}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class PreparedImage:
    """An image resized and centre-cropped to ``resolution``, as the VAE wants it.

    ``pixels`` [3, res, res] in [-1, 1]; ``original_size`` (height, width) before resizing and
    ``crop_top_left`` (top, left) of the crop in the resized image: SDXL's size conditioning.
    """

    pixels: torch.Tensor
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


def prepare_image(path: Path, resolution: int) -> PreparedImage:
    """Resize the shorter side to ``resolution`` (bilinear) and centre-crop a square, as the
    diffusers training scripts do with torchvision (not installed here, so done with PIL)."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as opened:
            image = opened.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise DatasetError(
            f"{path}: cannot read the image ({exc}); regenerate it with `selma images` or remove its row "
            "from metadata.jsonl"
        ) from None
    original_size = (image.height, image.width)
    scale = resolution / min(image.width, image.height)
    width, height = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    if (width, height) != (image.width, image.height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    top, left = round((height - resolution) / 2.0), round((width - resolution) / 2.0)
    image = image.crop((left, top, left + resolution, top + resolution))
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    return PreparedImage(pixels, original_size, (top, left))


def _stable_seed(*parts: int) -> int:
    # Python's hash() of ints is stable, but of tuples it is not meant to be a seed: use blake2b.
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@lru_cache(maxsize=4)
def _epoch_permutation(count: int, seed: int, epoch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(_stable_seed(seed, epoch, count))
    return torch.randperm(count, generator=generator)


def sample_index(position: int, count: int, seed: int) -> int:
    """The dataset index drawn at ``position`` of the endless sample stream: each epoch is a fresh
    seeded permutation of all ``count`` samples, so every sample is seen once per epoch."""
    epoch, offset = divmod(position, count)
    return int(_epoch_permutation(count, seed, epoch)[offset])


def sample_generator(seed: int, step: int, slot: int) -> torch.Generator:
    """The CPU generator for the random draws (timestep, noise, latent sample) of the sample in
    ``slot`` of optimizer step ``step``: the same draws however the batch is split."""
    return torch.Generator().manual_seed(_stable_seed(seed, step, slot, 7))
