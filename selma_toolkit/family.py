"""The record types of the family registry (``selma_toolkit.architectures`` holds the records).

A :class:`Family` says everything that differs between base-model families as data: which
diffusers pipeline and denoiser classes it has, its text encoders, how the pipeline is called,
how its latents are normalised and its denoiser conditioned, which LoRA layouts its ecosystem
reads, how its blocks are named for block weights, its published denoiser config (the real-size
model, built on the meta device for fit checks) and its tiny test model.

Pure Python on purpose: ``selma_toolkit.lora`` and the ComfyUI pack import it, and ComfyUI may
lack diffusers, transformers and peft. Class names are strings, resolved where they are used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a family: its pipeline component, tokenizer folder and class, and how
    LoRA files name it (kohya prefix, ComfyUI's CLIP name)."""

    component: str  # pipeline attribute / subfolder: "text_encoder", "text_encoder_2"
    tokenizer: str  # tokenizer subfolder: "tokenizer", "tokenizer_2"
    model_class: str  # transformers class: "CLIPTextModel", "CLIPTextModelWithProjection", "Qwen3Model"...
    kohya_prefix: str  # "lora_te_" (one encoder) or "lora_te1_" / "lora_te2_" (two)
    comfy_clip: str  # the text model's name inside ComfyUI's CLIP object: "clip_l", "clip_h", "clip_g", "qwen3_4b"...
    hidden_size: int  # of the real model: a clue that tells families apart
    layers: int  # transformer layers of the real model: a clue too
    # "clip" (a CLIP text tower), "t5" (T5EncoderModel: its tokenizer is a T5Tokenizer), or a chat
    # language model read through its hidden states: "qwen2.5-vl" (Qwen-Image), "qwen3" (Z-Image, FLUX.2 [klein]).
    kind: str = "clip"
    max_length: int = 77  # tokens the pipeline pads / truncates prompts to (CLIP 77; T5 as the pipeline's default)


@dataclass(frozen=True)
class TinyConfig:
    """The embedded random test model of a family (``tiny:<name>``): denoiser and scheduler
    keyword arguments for the diffusers classes, text-encoder activation. ``tiny.py`` builds it."""

    denoiser: Mapping[str, Any]
    scheduler_class: str
    scheduler: Mapping[str, Any]
    text_activations: tuple[str, ...]  # one per text encoder ("quick_gelu" as CLIP ViT-L, "gelu"; "t5", "qwen")
    # T5EncoderModel keyword arguments for a family with a T5 text encoder (d_model, num_layers...).
    t5: Mapping[str, Any] = field(default_factory=_empty)
    # The VAE's keyword arguments: over the shared tiny AutoencoderKL's for that class (Flux's VAE:
    # shift factor, no quant convs); all of them for another VAE class (Family.vae_class).
    vae: Mapping[str, Any] = field(default_factory=_empty)
    # The chat language model's config keyword arguments (Qwen2.5-VL: text_config / vision_config; Qwen3).
    language_model: Mapping[str, Any] = field(default_factory=_empty)
    # Denoiser parameters the diffusers class leaves uninitialised (torch.empty): drawn from the seed.
    seeded_parameters: tuple[str, ...] = ()
    # Buffers of the VAE set from the seed so that a normalisation by them is not the identity
    # (FLUX.2's batch-norm running statistics): name -> "mean" (standard normal) or "var" (in [0.5, 2)).
    seeded_vae_buffers: Mapping[str, str] = field(default_factory=_empty)


@dataclass(frozen=True)
class Family:
    """Everything family-specific, in one place. Fields are data, so every rule is visible here."""

    name: str  # the value of ``selma.architecture`` in our files and of ``tiny:<name>`` (sd1, flux2-klein...)
    title: str  # for people: "SD 1.x"
    pipeline_class: str  # diffusers text-to-image pipeline
    denoiser: str  # pipeline component trained with LoRA: "unet", or "transformer" (the DiT families)
    denoiser_class: str  # diffusers class: "UNet2DConditionModel", "FluxTransformer2DModel"...
    text_encoders: tuple[TextEncoder, ...]
    # Conditioning: which hidden state of each text encoder the denoiser reads (-1: last, as SD 1.x
    # and 2.x pipelines; -2: penultimate, as SDXL and SD 3's CLIPs) and whether it adds pooled text
    # + size time ids (SDXL).
    text_hidden_layer: int
    pooled_and_time_ids: bool
    # "scheduler": epsilon or v_prediction, as the model's scheduler config says (DDPM training);
    # "flow": rectified flow (noisy = (1 - sigma) x0 + sigma noise, target noise - x0), the DiT families.
    loss_target: str
    lora_targets: tuple[str, ...]  # default peft target modules of the denoiser (train.target_modules unset)
    kohya_base_version: str  # kohya's ss_base_model_version
    modelspec_architecture: str  # Stability ModelSpec, without "/lora"
    resolution: int  # native image size
    hub_tag: str  # Hub model-card tag next to "lora", "text-to-image"
    comfy_model_classes: tuple[str, ...]  # class names of ComfyUI's model_base for this family
    cross_attention_dim: int  # of the real model's denoiser: the width its attn2.to_k/to_v read (its text width)
    tiny: TinyConfig
    # The published config.json of the real model's denoiser (its architecture keys): the real-size
    # model is built from it on the meta device to check that an expert fits, with nothing downloaded.
    published_denoiser: Mapping[str, Any] = field(default_factory=_empty)
    published_model: str = ""  # the Hub repo that config is published in
    # Clues: a LoRA key that starts with one of these belongs to this family only; several
    # transformer blocks per attention (transformer_blocks.1...); conv (not Linear) proj_in / proj_out.
    stacked_transformer_blocks: bool = False
    conv_proj_in: bool = False
    module_prefixes: tuple[str, ...] = ()
    # How the denoiser is called and the prompt encoded (train/conditioning.py has one entry per
    # value): "unet" (SD 1.x / 2.x / XL); "mmdit" (SD 3); "packed" (Flux: T5 + CLIP-L pooled, 2x2
    # packed latents, guidance embedding); "packed-mask" (Chroma: T5 with its mask); "qwen-vl"
    # (Qwen-Image), "qwen3-list" (Z-Image), "flux2" (FLUX.2: a chat language model's hidden states,
    # each family's own latent layout).
    conditioning: str = "unet"
    # Transformer widths (attention inner dim) and pooled-text widths of the real models: clues for
    # files whose module names two DiT families share. Empty for the UNet families.
    denoiser_widths: tuple[int, ...] = ()
    pooled_width: int = 0
    # A denoiser config (diffusers config.json) that matches this family's shape rule.
    matches_config: Callable[[Mapping[str, Any]], bool] = field(default=lambda config: False, repr=False)
    kohya_version_prefixes: tuple[str, ...] = ()  # ss_base_model_version values that name it
    modelspec_prefixes: tuple[str, ...] = ()  # modelspec.architecture values that name it
    extra_pipeline_classes: tuple[str, ...] = ()  # other diffusers pipelines of the family (img2img...)
    # The LoRA file layouts written for this family, the default first (lora/files.py): "kohya"
    # (lora_unet_ / lora_te_ names), "peft" (<component>.<diffusers path>.lora_A/B, as diffusers'
    # save_lora_weights), "ai-toolkit" (diffusion_model.<path in the trainer's model>.lora_A/B). Each
    # is one that both diffusers' load_lora_weights and ComfyUI's LoraLoader read for the family.
    layouts: tuple[str, ...] = ("kohya", "peft")
    # For the "ai-toolkit" layout: module paths as diffusers names them ("diffusers") or as the
    # original (BFL) code does, with fused q/k/v ("bfl-flux2": FLUX.2, as ComfyUI and ai-toolkit name it).
    native_names: str = "diffusers"
    # Pipeline call: the keyword its classifier-free guidance scale goes to ("guidance_scale", or
    # Qwen-Image's "true_cfg_scale"); whether it takes a negative prompt for that guidance (Flux's
    # guidance_scale is a distilled embedding, FLUX.2 [klein] has no negative_prompt argument); the
    # negative prompt used when the recipe sets none (Qwen-Image's true CFG acts only with one).
    guidance_argument: str = "guidance_scale"
    negative_prompt: bool = True
    default_negative_prompt: str | None = None
    # The VAE class and how its latents are normalised for the denoiser: "scaled" ((z - shift_factor)
    # * scaling_factor), "per-channel" (Qwen-Image's video VAE: one frame, (z - latents_mean) /
    # latents_std per channel), "batch-norm" (FLUX.2: 2x2 patches normalised by the VAE's
    # batch-norm running statistics).
    vae_class: str = "AutoencoderKL"
    latents: str = "scaled"
    # Block weights (lora/blocks.py): the denoiser's block containers -> the group name users write
    # ("in" / "out" / "mid" for the UNet, "double" / "single" for Flux-type, "transformer_blocks",
    # "layers"...), and whether ComfyUI Inspire pack's LoRA Block Weight vectors have a convention
    # for the family (BASE, then one weight per block present: the UNet's input / middle / output
    # blocks, Flux-type double / single blocks).
    block_groups: Mapping[str, str] = field(default_factory=_empty)
    block_vector: bool = False

    @property
    def text_encoder_components(self) -> tuple[str, ...]:
        return tuple(encoder.component for encoder in self.text_encoders)

    @property
    def components(self) -> tuple[str, ...]:
        """The model parts a LoRA of this family may adapt: the denoiser and the text encoders."""
        return (self.denoiser, *self.text_encoder_components)

    @property
    def default_layout(self) -> str:
        """The layout LoRA files of this family are written in unless another is asked for."""
        return self.layouts[0]

    def text_encoder(self, component: str) -> TextEncoder:
        for encoder in self.text_encoders:
            if encoder.component == component:
                return encoder
        raise KeyError(
            f"{self.name} has no text encoder {component!r}; it has {', '.join(self.text_encoder_components)}"
        )

    def pipeline_arguments(self, negative_prompt: str | None, guidance_scale: float, count: int) -> dict[str, Any]:
        """The guidance and negative-prompt keyword arguments of one call of the family's pipeline for
        ``count`` prompts, from a recipe's ``images.negative_prompt`` (None or "" when unset) and
        ``guidance_scale``. No negative prompt stays None (SDXL then uses zero negative embeddings)."""
        arguments: dict[str, Any] = {self.guidance_argument: guidance_scale}
        if self.negative_prompt:
            negative = negative_prompt or self.default_negative_prompt
            arguments["negative_prompt"] = [negative] * count if negative else None
        return arguments
