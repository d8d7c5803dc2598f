"""The latent and text caches: VAE latent distributions and text-encoder outputs, computed once
per dataset and stored as safetensors shards, so training runs without the VAE and the text
encoders in memory.

Each cache lives in ``<train_dir>/cache/<kind>-<key>/``: ``shard-NNNNN.safetensors`` files of up
to ``SHARD_SIZE`` samples (each written atomically, so a stopped build resumes at the first
missing shard) and ``index.json``, written last, which marks the cache complete. The key hashes
everything the cached values depend on: the VAE or text-encoder weights, the resolution, the
images or captions in order, the dtype and the cache format. A changed input gives a new key; the
old cache is removed once the new one is complete, and the log says what changed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from selma_toolkit.architectures import Family
from selma_toolkit.io import atomic_write_bytes, atomic_write_text, sha256_file
from selma_toolkit.train.data import TrainSample, prepare_image
from selma_toolkit.train.model import Conditioning, encode_conditioning, encode_images, sdxl_time_ids

log = logging.getLogger(__name__)

CACHE_FORMAT = "1"
SHARD_SIZE = 256
ENCODE_BATCH = 8
Encoder = Callable[[list[int]], dict[str, torch.Tensor]]
PADDED = ("prompt_embeds", "text_mask")  # cached tensors whose rows may differ in length (dim 1)


@dataclass(frozen=True)
class CacheSpec:
    """What a cache holds (``kind``: latents or text) and everything its values depend on."""

    kind: str
    parts: dict[str, str]

    @property
    def key(self) -> str:
        return hashlib.sha256(json.dumps(self.parts, sort_keys=True).encode()).hexdigest()

    @property
    def folder_name(self) -> str:
        return f"{self.kind}-{self.key[:16]}"


def component_fingerprint(model_dir: Path, subfolders: list[str]) -> str:
    """sha256 over the names and contents of every file in the given model subfolders (weights,
    configs, tokenizer files): the cached values change exactly when these do."""
    digest = hashlib.sha256()
    for sub in subfolders:
        for path in sorted((model_dir / sub).rglob("*")):
            if path.is_file():
                digest.update(f"{path.relative_to(model_dir)}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def _digest(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


def latent_cache_spec(model_dir: Path, resolution: int, digests: list[str]) -> CacheSpec:
    return CacheSpec(
        "latents",
        {
            "format": CACHE_FORMAT,
            "vae": component_fingerprint(model_dir, ["vae"]),
            "resolution": str(resolution),
            "images": _digest(digests),
            "count": str(len(digests)),
        },
    )


def text_cache_spec(
    model_dir: Path, encoder_names: list[str], dtype: torch.dtype, samples: list[TrainSample]
) -> CacheSpec:
    tokenizer_names = [name.replace("text_encoder", "tokenizer") for name in encoder_names]
    return CacheSpec(
        "text",
        {
            "format": CACHE_FORMAT,
            "text_encoders": component_fingerprint(model_dir, encoder_names + tokenizer_names),
            "dtype": str(dtype),
            "captions": _digest([s.text for s in samples]),
            "count": str(len(samples)),
        },
    )


def _changes(old: dict[str, str], new: dict[str, str]) -> str:
    names = {
        "vae": "VAE weights",
        "text_encoders": "text encoders",
        "images": "images",
        "captions": "captions",
        "resolution": "resolution",
        "count": "number of samples",
        "dtype": "dtype",
        "format": "cache format",
    }
    return ", ".join(names.get(k, k) for k in sorted(new) if old.get(k) != new[k]) or "nothing"


def is_complete(spec: CacheSpec, root: Path) -> bool:
    index_path = root / spec.folder_name / "index.json"
    return index_path.is_file() and json.loads(index_path.read_text()).get("key") == spec.key


def ensure_cache(
    spec: CacheSpec,
    root: Path,
    count: int,
    make_encoder: Callable[[], Encoder],
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Build the cache for ``spec`` under ``root`` unless it is complete; return its folder.

    ``make_encoder()`` is called only when some shard is missing (it loads the VAE or the text
    encoders); the encoder maps a list of at most ``ENCODE_BATCH`` dataset indices to a dict of
    tensors whose first dimension is the number of indices. Shards already on disk are kept.
    """
    from safetensors.torch import save

    folder = root / spec.folder_name
    index_path = folder / "index.json"
    if is_complete(spec, root):
        return folder
    encode: Encoder | None = None
    stale = [p for p in root.glob(f"{spec.kind}-*") if p.is_dir() and p != folder]
    for old in stale:
        old_index = old / "index.json"
        if old_index.is_file():
            changed = _changes(json.loads(old_index.read_text()).get("parts", {}), spec.parts)
            log.info("%s cache in %s is out of date (changed: %s); rebuilding", spec.kind, old, changed)
    shards = []
    for start in range(0, count, SHARD_SIZE):
        indices = list(range(start, min(start + SHARD_SIZE, count)))
        shard = folder / f"shard-{start // SHARD_SIZE:05d}.safetensors"
        shards.append(shard.name)
        if not shard.is_file():
            encode = encode or make_encoder()
            parts = [encode(indices[i : i + ENCODE_BATCH]) for i in range(0, len(indices), ENCODE_BATCH)]
            tensors = {name: cat_rows([p[name] for p in parts], name).contiguous() for name in parts[0]}
            atomic_write_bytes(shard, save(tensors, metadata={"key": spec.key, "start": str(start)}))
        if progress is not None:
            progress(indices[-1] + 1, count)
    atomic_write_text(
        index_path,
        json.dumps(
            {"key": spec.key, "parts": spec.parts, "count": count, "shard_size": SHARD_SIZE, "shards": shards}, indent=1
        ),
    )
    for old in stale:
        shutil.rmtree(old, ignore_errors=True)
    return folder


class CachedTensors:
    """Rows of a complete cache, read on demand from its shards (memory-mapped by safetensors)."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        index = json.loads((folder / "index.json").read_text())
        self.shard_size = int(index["shard_size"])
        self._shards = [safe_open(str(folder / name), framework="pt") for name in index["shards"]]

    def rows(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """The cached tensors of the given dataset indices, stacked in that order."""
        picked: dict[str, list[torch.Tensor]] = {}
        for index in indices:
            shard, row = divmod(index, self.shard_size)
            handle = self._shards[shard]
            for name in handle.keys():  # noqa: SIM118 - a safetensors safe_open handle is not iterable
                picked.setdefault(name, []).append(handle.get_slice(name)[row : row + 1])
        return {name: cat_rows(rows, name) for name, rows in picked.items()}


def cat_rows(rows: list[torch.Tensor], name: str) -> torch.Tensor:
    """Rows of a cached tensor stacked along the batch. Prompt states and their mask may differ in
    length (the prompts' own tokens, Qwen-Image and Z-Image): shorter ones are padded with zeros
    (mask 0) to the longest, which the transformer reads through the mask as the unpadded prompt."""
    if name in PADDED and len({row.shape[1] for row in rows}) > 1:
        length = max(row.shape[1] for row in rows)
        rows = [torch.nn.functional.pad(row, (0, 0) * (row.dim() - 2) + (0, length - row.shape[1])) for row in rows]
    return torch.cat(rows)


def latent_encoder(samples: list[TrainSample], vae, resolution: int, family: Family | None = None) -> Encoder:
    """indices -> {mean, std, original_size, crop_top_left} through the VAE."""

    def encode(indices: list[int]) -> dict[str, torch.Tensor]:
        images = [prepare_image(samples[i].image, resolution) for i in indices]
        mean, std = encode_images(vae, torch.stack([im.pixels for im in images]), family)
        return {
            "mean": mean.cpu(),
            "std": std.cpu(),
            "original_size": torch.tensor([im.original_size for im in images]),
            "crop_top_left": torch.tensor([im.crop_top_left for im in images]),
        }

    return encode


def caption_encoder(
    samples: list[TrainSample], tokenizers: list, encoders: list, device: torch.device, *, family: Family
) -> Encoder:
    """indices -> {prompt_embeds[, pooled][, text_mask]} through the frozen text encoders, stored as
    float32 (the mask as int64), encoded as the family's pipeline does (``encode_conditioning``)."""

    def encode(indices: list[int]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            encoded = encode_conditioning(family, tokenizers, encoders, [samples[i].text for i in indices], device)
        return {name: (value.long() if name == "text_mask" else value.float()).cpu() for name, value in encoded.items()}

    return encode


class ConditionSource:
    """Conditioning for a list of dataset indices, from the caches where they exist and through
    the VAE / text encoders otherwise (the text encoders always, when they are trained)."""

    def __init__(
        self,
        samples: list[TrainSample],
        resolution: int,
        device: torch.device,
        *,
        family: Family,
        latents: CachedTensors | None = None,
        texts: CachedTensors | None = None,
        vae=None,
        tokenizers: list | None = None,
        text_encoders: list | None = None,
    ):
        self.samples, self.resolution, self.device, self.family = samples, resolution, device, family
        self.latents, self.texts = latents, texts
        self.encode_latents = latent_encoder(samples, vae, resolution, family) if latents is None else None
        self.tokenizers, self.text_encoders = tokenizers or [], text_encoders or []
        self.train_text = any(p.requires_grad for e in self.text_encoders for p in e.parameters())

    def __call__(self, indices: list[int]) -> Conditioning:
        image = self.latents.rows(indices) if self.latents is not None else self.encode_latents(indices)
        if self.texts is not None:
            text = self.texts.rows(indices)
        else:
            captions = [self.samples[i].text for i in indices]
            with torch.set_grad_enabled(self.train_text):
                text = encode_conditioning(self.family, self.tokenizers, self.text_encoders, captions, self.device)
        embeds, pooled, mask = text["prompt_embeds"], text.get("pooled"), text.get("text_mask")
        time_ids = None
        if pooled is not None and self.family.pooled_and_time_ids:
            time_ids = sdxl_time_ids(image["original_size"], image["crop_top_left"], self.resolution).to(self.device)
        if pooled is not None:
            pooled = pooled.to(self.device)
        return Conditioning(
            latent_mean=image["mean"].to(self.device),
            latent_std=image["std"].to(self.device),
            prompt_embeds=embeds.to(self.device),
            pooled=pooled,
            time_ids=time_ids,
            text_mask=None if mask is None else mask.to(self.device),
        )
