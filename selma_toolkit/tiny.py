"""The embedded default: tiny, randomly initialised text-to-image models, built from configs.

Same architecture classes as the real models (UNet2DConditionModel, AutoencoderKL, CLIP text
encoders, CLIP tokenizer, the real schedulers), so every stage runs on them unchanged, on a CPU,
with no download. Their images mean nothing; their code paths are the real ones.

The configs live in each family's record (``selma_toolkit.architectures``, ``Family.tiny``):

* ``sd1``: SD 1.x layout (one CLIPTextModel, epsilon prediction, PNDM scheduler as SD 1.4/1.5).
* ``sd2``: SD 2.x layout (linear projections, per-block head dims, v-prediction as SD 2 768-v).
* ``sdxl``: SDXL layout (two text encoders, pooled embeddings, ``text_time`` added conditions).
* ``sd3``: SD 3 layout (SD3Transformer2DModel, CLIP-L/G with projection + a small T5EncoderModel,
  flow matching with FlowMatchEulerDiscreteScheduler).
* ``flux``: Flux layout (FluxTransformer2DModel with double- and single-stream blocks and the guidance
  embedding as FLUX.1-dev, CLIP-L pooled + a small T5EncoderModel, flow matching with dynamic shift).
* ``chroma``: ChromaTransformer2DModel (its distilled guidance network), a small T5 read with its mask.
* ``qwen-image``: QwenImageTransformer2DModel, a tiny Qwen2_5_VLForConditionalGeneration, the
  AutoencoderKLQwenImage video VAE with per-channel latent statistics.
* ``z-image``: ZImageTransformer2DModel (refiners and main layers), a tiny Qwen3Model.
* ``flux2-klein``: Flux2Transformer2DModel, a 28-layer tiny Qwen3ForCausalLM (the pipeline stacks its
  hidden states 9, 18 and 27), AutoencoderKLFlux2 with batch-norm statistics that are not the identity.

Tokenizers and text encoders are built in memory too (``selma_toolkit.tiny_text``).

The same call writes the same weights: every component is built right after ``torch.manual_seed``.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from selma_toolkit.architectures import FAMILY_NAMES, get_family
from selma_toolkit.config.registries import import_object
from selma_toolkit.tiny_text import (  # noqa: F401 - tiny_tokenizer and _learn_merges are imported from here too
    _learn_merges,
    clip_config,
    language_model,
    t5_encoder,
    tiny_chat_tokenizer,
    tiny_t5_tokenizer,
    tiny_tokenizer,
    tiny_wordpiece_tokenizer,
)

ARCHITECTURES: tuple[str, ...] = FAMILY_NAMES  # every family has a tiny config in its record
TINY_PREFIX = "tiny:"
# Bump when a config below changes, so cached copies are rebuilt.
TINY_VERSION = 1


def _vae(family):
    """The family's tiny VAE: for AutoencoderKL the shared small layout with the family's
    ``TinyConfig.vae`` settings over it, for another class (Qwen-Image's, FLUX.2's) those settings
    alone; buffers named in ``TinyConfig.seeded_vae_buffers`` drawn from the current seed."""
    import diffusers
    import torch

    settings = dict(family.tiny.vae)
    if family.vae_class == "AutoencoderKL":
        # Two blocks: the VAE downsamples by 2 (a real one by 8); the pipelines read the factor from it.
        settings = {
            "block_out_channels": (32, 64),
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
            "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
            "latent_channels": 4,
            "norm_num_groups": 16,
            "sample_size": 64,
            **settings,
        }
    vae = getattr(diffusers, family.vae_class)(**settings)
    with torch.no_grad():
        for name, kind in family.tiny.seeded_vae_buffers.items():
            buffer = vae.get_buffer(name)
            values = torch.randn(buffer.shape) if kind == "mean" else 0.5 + 1.5 * torch.rand(buffer.shape)
            buffer.copy_(values)
    return vae


def _text_parts(family, seed: int) -> dict[str, Any]:
    """The tokenizer and text encoder of every text encoder of the family, each encoder built right
    after seeding with ``seed + 2 + its index``."""
    import torch
    import transformers

    clip = tiny_tokenizer()
    parts: dict[str, Any] = {}
    for index, (spec, act) in enumerate(zip(family.text_encoders, family.tiny.text_activations)):
        torch.manual_seed(seed + 2 + index)
        if spec.kind == "t5":
            parts[spec.tokenizer] = tiny_t5_tokenizer(spec.max_length)
            parts[spec.component] = t5_encoder(len(parts[spec.tokenizer]), family.tiny.t5)
        elif spec.kind == "clip":
            model_class = getattr(transformers, spec.model_class)
            parts[spec.component] = model_class(clip_config(len(clip), 32, 32, act))
            parts[spec.tokenizer] = clip if index == 0 else tiny_tokenizer()
        else:  # a chat language model read through its hidden states
            parts[spec.tokenizer] = tiny_chat_tokenizer()
            parts[spec.component] = language_model(spec.model_class, family.tiny.language_model, parts[spec.tokenizer])
    return parts


def build_tiny_pipeline(arch: str = "sd1", seed: int = 0):
    """Build a tiny random pipeline of the given family (in memory), from its record's
    :class:`~selma_toolkit.architectures.TinyConfig`: denoiser, scheduler, one small CLIP text
    encoder (32 wide) per CLIP of the family, a small T5 (``TinyConfig.t5``) per T5, a small chat
    language model (``TinyConfig.language_model``) with the in-memory Qwen tokenizer, and the
    family's VAE class at a tiny size."""
    import diffusers
    import torch

    try:
        family = get_family(arch)
    except ValueError as exc:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHITECTURES)}") from exc
    torch.manual_seed(seed)
    denoiser = getattr(diffusers, family.denoiser_class)(**family.tiny.denoiser)
    with torch.no_grad():
        for name in family.tiny.seeded_parameters:  # left as torch.empty by the class
            denoiser.get_parameter(name).normal_()
    scheduler = getattr(diffusers, family.tiny.scheduler_class)(**family.tiny.scheduler)
    torch.manual_seed(seed + 1)
    parts: dict[str, Any] = {
        family.denoiser: denoiser,
        "vae": _vae(family),
        "scheduler": scheduler,
        **_text_parts(family, seed),
    }
    pipeline_class = getattr(diffusers, family.pipeline_class)
    accepted = inspect.signature(pipeline_class.__init__).parameters
    if "safety_checker" in accepted:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if "image_encoder" in accepted:  # Chroma's optional IP-Adapter parts
        parts.update(image_encoder=None, feature_extractor=None)
    return pipeline_class(**parts)


def create_tiny_model(out: str | os.PathLike[str], arch: str = "sd1", seed: int = 0) -> Path:
    """Write a tiny model in the standard diffusers folder layout (model_index.json, unet/, vae/,
    text_encoder/, tokenizer/, scheduler/; SDXL adds text_encoder_2/ and tokenizer_2/; the DiT
    families have transformer/ instead of unet/; SD 3 and Flux a T5 in text_encoder_3/ or text_encoder_2/).

    The folder appears whole or not at all (built in a temporary folder, then renamed).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; choose a new folder")
    pipe = build_tiny_pipeline(arch, seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "selma_tiny.json").write_text(json.dumps({"arch": arch, "seed": seed, "version": TINY_VERSION}))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def cache_dir() -> Path:
    """Where built tiny models are kept: $SELMA_CACHE or ~/.cache/selma."""
    return Path(os.environ.get("SELMA_CACHE", Path.home() / ".cache" / "selma"))


def is_tiny_spec(spec: str) -> bool:
    return spec.startswith(TINY_PREFIX)


def ensure_tiny_model(spec: str) -> Path:
    """Path of the tiny model named by ``"tiny:<arch>"`` (optionally ``"tiny:<arch>:<seed>"``),
    built into the cache on first use."""
    parts = spec[len(TINY_PREFIX) :].split(":")
    arch = parts[0]
    if arch not in ARCHITECTURES or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ValueError(f"{spec!r}: expected tiny:<arch>[:<seed>] with arch one of {', '.join(ARCHITECTURES)}")
    seed = int(parts[1]) if len(parts) == 2 else 0
    path = cache_dir() / "tiny" / f"{arch}-seed{seed}-v{TINY_VERSION}"
    if not (path / "model_index.json").is_file():
        try:
            create_tiny_model(path, arch, seed)  # type: ignore[arg-type]
        except OSError:
            # Another process finished the same build first: its copy is identical.
            if not (path / "model_index.json").is_file():
                raise
    return path


# --------------------------------------------------------------------------------------------
# Tiny scorer models (evaluation): a CLIP model and a BLIP VQA model, random, built from configs
# --------------------------------------------------------------------------------------------

# The tiny VQA judges (image-text-to-text models) of selma_toolkit.tiny_vlm, loaded on use as the
# registries are (config/registries.py), since that module builds on this one.
TINY_VLMS: dict[str, str] = {
    "blip2": "selma_toolkit.tiny_vlm:build_tiny_blip2",
    "paligemma": "selma_toolkit.tiny_vlm:build_tiny_paligemma",
    "llava": "selma_toolkit.tiny_vlm:build_tiny_llava",
    "qwen2.5-vl": "selma_toolkit.tiny_vlm:build_tiny_qwen25_vl",
}
SCORER_MODELS: tuple[str, ...] = ("clip", "vqa", *TINY_VLMS)
_SCORER_IMAGE_SIZE = 32


def build_tiny_clip(seed: int = 0):
    """A tiny random ``CLIPModel`` (32 px images) and its ``CLIPProcessor`` (tiny CLIP tokenizer)."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = tiny_tokenizer()
    vocab_size = len(tokenizer)
    text = clip_config(vocab_size, 32, 16, "quick_gelu").to_dict()
    vision = dict(
        image_size=_SCORER_IMAGE_SIZE,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act="quick_gelu",
    )
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    # The PIL image processor: the default one needs torchvision, which this project does not install.
    size = _SCORER_IMAGE_SIZE
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_tiny_vqa(seed: int = 0):
    """A tiny random ``BlipForQuestionAnswering`` (32 px images) and its ``BlipProcessor``."""
    import torch
    from transformers import BlipConfig, BlipForQuestionAnswering, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    tokenizer = tiny_wordpiece_tokenizer()
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        encoder_hidden_size=32,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        sep_token_id=tokenizer.sep_token_id,
        bos_token_id=tokenizer.convert_tokens_to_ids("[DEC]"),
    )
    vision = dict(
        image_size=_SCORER_IMAGE_SIZE,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
    )
    torch.manual_seed(seed)
    model = BlipForQuestionAnswering(BlipConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    size = _SCORER_IMAGE_SIZE
    image_processor = BlipImageProcessorPil(size={"height": size, "width": size})
    return model, BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def ensure_tiny_scorer_model(spec: str) -> Path:
    """Folder of the tiny scorer model named ``"tiny:clip"``, ``"tiny:vqa"`` or a tiny VQA judge
    (``TINY_VLMS``), written on first use with ``save_pretrained`` (model + processor), so scorers
    load it like any Hub model."""
    kind = spec[len(TINY_PREFIX) :] if is_tiny_spec(spec) else ""
    if kind not in SCORER_MODELS:
        raise ValueError(f"{spec!r}: expected one of {', '.join(TINY_PREFIX + k for k in SCORER_MODELS)}")
    path = cache_dir() / "tiny" / f"{kind}-seed0-v{TINY_VERSION}"
    if not (path / "config.json").is_file():
        build = {"clip": build_tiny_clip, "vqa": build_tiny_vqa}.get(kind) or import_object(TINY_VLMS[kind])
        model, processor = build()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
            os.replace(tmp, path)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            # OSError from the rename: another process finished the same build first (identical copy).
            if not (isinstance(exc, OSError) and (path / "config.json").is_file()):
                raise
    return path
