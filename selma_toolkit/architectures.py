"""Base-model families: what the toolkit knows about SD 1.x, SD 2.x, SDXL, SD 3 and Flux, one record each.

Every module that needs a family fact (which text encoders a model has, how a file's metadata
names its base, which ComfyUI model class it is, the Hub tag, the tiny test model's config) looks
the family up here instead of comparing strings:

    family = get_family("sdxl")
    family.text_encoder_components        # ("text_encoder", "text_encoder_2")
    family_from_metadata({"ss_base_model_version": "sd_v1"}).name   # "sd1"

Adding a family is one :class:`Family` record in :data:`FAMILIES` (and, when it trains or samples
differently, one training path): see docs/architecture.md for a worked example.

Pure Python on purpose: ``selma_toolkit.lora`` and the ComfyUI pack import it, and ComfyUI may
lack diffusers, transformers and peft. Class names are strings, resolved where they are used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any


@dataclass(frozen=True)
class TextEncoder:
    """One text encoder of a family: its pipeline component, tokenizer folder and class, and how
    LoRA files name it (kohya prefix, ComfyUI's CLIP name)."""

    component: str  # pipeline attribute / subfolder: "text_encoder", "text_encoder_2"
    tokenizer: str  # tokenizer subfolder: "tokenizer", "tokenizer_2"
    model_class: str  # transformers class: "CLIPTextModel", "CLIPTextModelWithProjection"
    kohya_prefix: str  # "lora_te_" (one encoder) or "lora_te1_" / "lora_te2_" (two)
    comfy_clip: str  # the CLIP model's name inside ComfyUI's CLIP object: "clip_l", "clip_h", "clip_g"
    hidden_size: int  # of the real model: a clue that tells families apart
    layers: int  # transformer layers of the real model: a clue too
    kind: str = "clip"  # "clip" (a CLIP text tower) or "t5" (T5EncoderModel: its tokenizer is a T5Tokenizer)
    max_length: int = 77  # tokens the pipeline pads / truncates prompts to (CLIP 77; T5 as the pipeline's default)


@dataclass(frozen=True)
class TinyConfig:
    """The embedded random test model of a family (``tiny:<name>``): denoiser and scheduler
    keyword arguments for the diffusers classes, text-encoder activation. ``tiny.py`` builds it."""

    denoiser: Mapping[str, Any]
    scheduler_class: str
    scheduler: Mapping[str, Any]
    text_activations: tuple[str, ...]  # one per text encoder ("quick_gelu" as CLIP ViT-L, "gelu"; "t5" for a T5)
    # T5EncoderModel keyword arguments for a family with a T5 text encoder (d_model, num_layers...).
    t5: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # AutoencoderKL keyword arguments over the shared tiny VAE's (Flux's VAE: shift factor, no quant convs).
    vae: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class Family:
    """Everything family-specific, in one place. Fields are data, so every rule is visible here."""

    name: str  # "sd1": the value of ``selma.architecture`` in our files and of ``tiny:<name>``
    title: str  # for people: "SD 1.x"
    pipeline_class: str  # diffusers text-to-image pipeline
    denoiser: str  # pipeline component trained with LoRA: "unet", or "transformer" (SD 3, Flux)
    denoiser_class: str  # diffusers class: "UNet2DConditionModel", "FluxTransformer2DModel"...
    text_encoders: tuple[TextEncoder, ...]
    # Conditioning: which hidden state of each text encoder the denoiser reads (-1: last, as SD 1.x
    # and 2.x pipelines; -2: penultimate, as SDXL and SD 3's CLIPs) and whether it adds pooled text
    # + size time ids (SDXL).
    text_hidden_layer: int
    pooled_and_time_ids: bool
    # "scheduler": epsilon or v_prediction, as the model's scheduler config says (DDPM training);
    # "flow": rectified flow (noisy = (1 - sigma) x0 + sigma noise, target noise - x0), SD 3 and Flux.
    loss_target: str
    lora_targets: tuple[str, ...]  # default peft target modules of the denoiser (train.target_modules unset)
    kohya_base_version: str  # kohya's ss_base_model_version
    modelspec_architecture: str  # Stability ModelSpec, without "/lora"
    resolution: int  # native image size
    hub_tag: str  # Hub model-card tag next to "lora", "text-to-image"
    comfy_model_classes: tuple[str, ...]  # class names of ComfyUI's model_base for this family
    cross_attention_dim: int  # of the real model's denoiser: the width its attn2.to_k/to_v read
    tiny: TinyConfig
    # Clues: a LoRA key that starts with one of these belongs to this family only; several
    # transformer blocks per attention (transformer_blocks.1...); conv (not Linear) proj_in / proj_out.
    stacked_transformer_blocks: bool = False
    conv_proj_in: bool = False
    module_prefixes: tuple[str, ...] = ()
    # How the denoiser is called and the prompt encoded: "unet" (SD 1.x / 2.x / XL: encoder hidden
    # states, SDXL's added conditions); "mmdit" (SD 3: CLIP-L + CLIP-G penultimate states beside T5's
    # in one sequence, pooled projections); "packed" (Flux: T5 states, CLIP-L pooled, latents packed
    # 2x2 with position ids, the guidance embedding).
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
    # What LoRA files for this family are written as by default (format "kohya", see lora/files.py):
    # "kohya" (lora_unet_ / lora_te_ names) or "diffusers" (``transformer.<path>.lora_A/B``, scale
    # folded into B), the one layout that both diffusers and ComfyUI load for the DiT families.
    default_layout: str = "kohya"
    # Whether the pipeline's classifier-free guidance at guidance_scale uses negative_prompt. Flux:
    # guidance_scale is the distilled guidance embedding; a negative prompt acts only with true_cfg_scale > 1.
    negative_prompt: bool = True

    @property
    def text_encoder_components(self) -> tuple[str, ...]:
        return tuple(encoder.component for encoder in self.text_encoders)

    @property
    def components(self) -> tuple[str, ...]:
        """The model parts a LoRA of this family may adapt: the denoiser and the text encoders."""
        return (self.denoiser, *self.text_encoder_components)

    def text_encoder(self, component: str) -> TextEncoder:
        for encoder in self.text_encoders:
            if encoder.component == component:
                return encoder
        raise KeyError(f"{self.name} has no text encoder {component!r}; it has {', '.join(self.text_encoder_components)}")


_CLIP_L = dict(model_class="CLIPTextModel", comfy_clip="clip_l", hidden_size=768, layers=12)
_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# The tiny UNets share one small layout (2 blocks, 1 layer per block, 32x32 latents).
_TINY_UNET: Mapping[str, Any] = MappingProxyType(dict(
    block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=16,
))
_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def _is_sd2_config(config: Mapping[str, Any]) -> bool:
    # SD 2.x's UNet has Linear projections in its transformers and per-block head dims; SD 1.x has neither.
    return bool(config.get("use_linear_projection")) or isinstance(config.get("attention_head_dim"), (list, tuple))


SD1 = Family(
    name="sd1", title="SD 1.x", pipeline_class="StableDiffusionPipeline",
    denoiser="unet", denoiser_class="UNet2DConditionModel",
    text_encoders=(TextEncoder("text_encoder", "tokenizer", kohya_prefix="lora_te_", **_CLIP_L),),
    text_hidden_layer=-1, pooled_and_time_ids=False, loss_target="scheduler", lora_targets=_UNET_TARGETS,
    kohya_base_version="sd_v1", modelspec_architecture="stable-diffusion-v1", resolution=512,
    hub_tag="stable-diffusion", comfy_model_classes=("SD15",), cross_attention_dim=768,
    tiny=TinyConfig(
        denoiser=MappingProxyType({**_TINY_UNET, "cross_attention_dim": 32, "attention_head_dim": 8}),
        scheduler_class="PNDMScheduler",
        scheduler=MappingProxyType({**_SD_BETAS, "skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False}),
        text_activations=("quick_gelu",),
    ),
    conv_proj_in=True,
    kohya_version_prefixes=("sd_v1",), modelspec_prefixes=("stable-diffusion-v1",),
    extra_pipeline_classes=("StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
)

SD2 = Family(
    name="sd2", title="SD 2.x", pipeline_class="StableDiffusionPipeline",
    denoiser="unet", denoiser_class="UNet2DConditionModel",
    text_encoders=(TextEncoder("text_encoder", "tokenizer", "CLIPTextModel", "lora_te_", "clip_h", hidden_size=1024, layers=23),),
    text_hidden_layer=-1, pooled_and_time_ids=False, loss_target="scheduler", lora_targets=_UNET_TARGETS,
    kohya_base_version="sd_v2", modelspec_architecture="stable-diffusion-v2-768-v", resolution=768,
    hub_tag="stable-diffusion", comfy_model_classes=("SD20",), cross_attention_dim=1024,
    tiny=TinyConfig(
        denoiser=MappingProxyType({**_TINY_UNET, "cross_attention_dim": 32, "attention_head_dim": (2, 4),
                                   "use_linear_projection": True}),
        scheduler_class="EulerDiscreteScheduler",
        scheduler=MappingProxyType({**_SD_BETAS, "steps_offset": 1, "prediction_type": "v_prediction",
                                    "timestep_spacing": "leading"}),
        text_activations=("gelu",),
    ),
    matches_config=_is_sd2_config,
    kohya_version_prefixes=("sd_v2",), modelspec_prefixes=("stable-diffusion-v2",),
)

SDXL = Family(
    name="sdxl", title="SDXL", pipeline_class="StableDiffusionXLPipeline",
    denoiser="unet", denoiser_class="UNet2DConditionModel",
    text_encoders=(
        TextEncoder("text_encoder", "tokenizer", kohya_prefix="lora_te1_", **_CLIP_L),
        TextEncoder("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection", "lora_te2_", "clip_g",
                    hidden_size=1280, layers=32),
    ),
    text_hidden_layer=-2, pooled_and_time_ids=True, loss_target="scheduler", lora_targets=_UNET_TARGETS,
    kohya_base_version="sdxl_base_v1-0", modelspec_architecture="stable-diffusion-xl-v1-base", resolution=1024,
    hub_tag="sdxl", comfy_model_classes=("SDXL",), cross_attention_dim=2048,
    tiny=TinyConfig(
        denoiser=MappingProxyType({
            **_TINY_UNET,
            "cross_attention_dim": 64,  # the two text encoders' hidden states, concatenated (32 + 32)
            "attention_head_dim": (2, 4), "use_linear_projection": True, "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8, "transformer_layers_per_block": (1, 2),
            "projection_class_embeddings_input_dim": 6 * 8 + 32,  # six time ids + pooled text (32)
        }),
        scheduler_class="EulerDiscreteScheduler",
        scheduler=MappingProxyType({**_SD_BETAS, "steps_offset": 1, "timestep_spacing": "leading"}),
        text_activations=("gelu", "gelu"),
    ),
    # The second text encoder and the added (pooled text + time ids) embedding exist only in SDXL.
    module_prefixes=("text_encoder_2.", "unet.add_embedding."), stacked_transformer_blocks=True,
    matches_config=lambda config: config.get("addition_embed_type") == "text_time",
    kohya_version_prefixes=("sdxl",), modelspec_prefixes=("stable-diffusion-xl",),
    extra_pipeline_classes=("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"),
)

# The DiT families: joint (double-stream) attention has the text stream's projections beside the image's.
_JOINT_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_T5_XXL = dict(model_class="T5EncoderModel", comfy_clip="t5xxl", hidden_size=4096, layers=24, kind="t5")
# A tiny T5 (2 layers, 4 heads); d_model is the transformer's joint_attention_dim.
_TINY_T5 = dict(d_ff=64, d_kv=8, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                relative_attention_max_distance=16, feed_forward_proj="gated-gelu", dropout_rate=0.0)
_FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"

SD3 = Family(
    name="sd3", title="SD 3", pipeline_class="StableDiffusion3Pipeline",
    denoiser="transformer", denoiser_class="SD3Transformer2DModel",
    text_encoders=(
        TextEncoder("text_encoder", "tokenizer", "CLIPTextModelWithProjection", "lora_te1_", "clip_l",
                    hidden_size=768, layers=12),
        TextEncoder("text_encoder_2", "tokenizer_2", "CLIPTextModelWithProjection", "lora_te2_", "clip_g",
                    hidden_size=1280, layers=32),
        TextEncoder("text_encoder_3", "tokenizer_3", kohya_prefix="lora_te3_", max_length=256, **_T5_XXL),
    ),
    text_hidden_layer=-2, pooled_and_time_ids=False, loss_target="flow", lora_targets=_JOINT_ATTENTION_TARGETS,
    kohya_base_version="sd3", modelspec_architecture="stable-diffusion-3-medium", resolution=1024,
    hub_tag="sd3", comfy_model_classes=("SD3",), cross_attention_dim=4096,
    tiny=TinyConfig(
        denoiser=MappingProxyType(dict(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
            num_attention_heads=4, joint_attention_dim=64,  # the T5 width; the two CLIPs' 32 + 32 are padded to it
            caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=32,  # pooled: 32 + 32
        )),
        scheduler_class=_FLOW_SCHEDULER, scheduler=MappingProxyType(dict(num_train_timesteps=1000, shift=3.0)),
        text_activations=("gelu", "gelu", "t5"),
        t5=MappingProxyType({**_TINY_T5, "d_model": 64}),
        vae=MappingProxyType(dict(scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                                  use_post_quant_conv=False)),
    ),
    conditioning="mmdit", denoiser_widths=(1536, 2432), pooled_width=2048,
    module_prefixes=("text_encoder_3.", "transformer.pos_embed."),
    matches_config=lambda config: "pos_embed_max_size" in config or "caption_projection_dim" in config,
    kohya_version_prefixes=("sd3",), modelspec_prefixes=("stable-diffusion-3",),
    extra_pipeline_classes=("StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"),
    default_layout="diffusers",
)

FLUX = Family(
    name="flux", title="Flux", pipeline_class="FluxPipeline",
    denoiser="transformer", denoiser_class="FluxTransformer2DModel",
    text_encoders=(
        TextEncoder("text_encoder", "tokenizer", kohya_prefix="lora_te1_", **_CLIP_L),
        # kohya's Flux scripts name the T5 lora_te3_, OneTrainer lora_te2_; ComfyUI maps both. lora_te2_ here,
        # so that a prefix names one component over every family (SD 3's lora_te3_ is its third encoder).
        TextEncoder("text_encoder_2", "tokenizer_2", kohya_prefix="lora_te2_", max_length=512, **_T5_XXL),
    ),
    text_hidden_layer=-1, pooled_and_time_ids=False, loss_target="flow", lora_targets=_JOINT_ATTENTION_TARGETS,
    kohya_base_version="flux1", modelspec_architecture="flux-1-dev", resolution=1024,
    hub_tag="flux", comfy_model_classes=("Flux", "FluxSchnell", "FluxInpaint"), cross_attention_dim=4096,
    tiny=TinyConfig(
        denoiser=MappingProxyType(dict(
            patch_size=1, in_channels=16,  # 4 latent channels packed 2x2, as FluxPipeline._pack_latents does
            num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8),
        )),
        scheduler_class=_FLOW_SCHEDULER,
        scheduler=MappingProxyType(dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)),
        text_activations=("quick_gelu", "t5"),
        t5=MappingProxyType({**_TINY_T5, "d_model": 32}),
        vae=MappingProxyType(dict(scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                                  use_post_quant_conv=False)),
    ),
    conditioning="packed", denoiser_widths=(3072,), pooled_width=768,
    # Single-stream blocks and the guidance embedding exist only in Flux.
    module_prefixes=("transformer.single_transformer_blocks.", "transformer.time_text_embed.guidance_embedder."),
    matches_config=lambda config: "num_single_layers" in config,
    kohya_version_prefixes=("flux",), modelspec_prefixes=("flux-1",),
    extra_pipeline_classes=("FluxImg2ImgPipeline", "FluxInpaintPipeline"),
    default_layout="diffusers", negative_prompt=False,
)

# Order matters where clues overlap: a config is tested against the families in this order, and
# the first family without a config rule (SD 1.x) is what a plain UNet config is.
FAMILIES: Mapping[str, Family] = MappingProxyType({family.name: family for family in (FLUX, SD3, SDXL, SD2, SD1)})
FAMILY_NAMES: tuple[str, ...] = ("sd1", "sd2", "sdxl", "sd3", "flux")  # in the order people list them
# The model parts LoRA trains in each kind of family (the UNet, or the DiT families' transformer).
DENOISERS: tuple[str, ...] = tuple(dict.fromkeys(FAMILIES[name].denoiser for name in FAMILY_NAMES))
# Every model part a LoRA of any family may adapt, in a stable order.
COMPONENTS: tuple[str, ...] = tuple(dict.fromkeys(c for name in FAMILY_NAMES for c in FAMILIES[name].components))
# How LoRA files spell a text encoder -> our component, over every family. kohya's lora_te_
# (one encoder) and lora_te1_ both mean the first one; ComfyUI's clip_l / clip_h are the first, clip_g the second.
KOHYA_TEXT_PREFIXES: tuple[tuple[str, str], ...] = tuple(sorted(
    {(encoder.kohya_prefix, encoder.component) for family in FAMILIES.values() for encoder in family.text_encoders},
    key=lambda item: (-len(item[0]), item[0]),
))
# ComfyUI's text-encoder names that mean one component in every family: t5xxl is SD 3's third
# encoder but Flux's second, so it is left out (files are read as ``text_encoders.<name>...``).
_COMFY_CLIPS = {(encoder.comfy_clip, encoder.component) for family in FAMILIES.values() for encoder in family.text_encoders}
COMFY_CLIP_COMPONENTS: Mapping[str, str] = MappingProxyType({
    clip: component for clip, component in sorted(_COMFY_CLIPS) if sum(c == clip for c, _ in _COMFY_CLIPS) == 1
})


def get_family(name: str) -> Family:
    """The family named ``name`` ("sd1", "sd2", "sdxl", "sd3", "flux"); ValueError naming the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"architecture {name!r}: expected one of {', '.join(FAMILY_NAMES)}") from None


def family_titles() -> str:
    """The families for a message: "SD 1.x, SD 2.x, SDXL, SD 3 or Flux"."""
    titles = [FAMILIES[name].title for name in FAMILY_NAMES]
    return ", ".join(titles[:-1]) + " or " + titles[-1]


def family_of_pipeline(pipeline_class: str, denoiser_config: Mapping[str, Any]) -> Family:
    """The family of a diffusers model from its ``model_index.json`` class name and its denoiser's
    config: a pipeline class only one family uses decides; otherwise the config's shape rules
    (tested in :data:`FAMILIES` order), and SD 1.x when none matches."""
    owners = [family for family in FAMILIES.values() if pipeline_class in (family.pipeline_class, *family.extra_pipeline_classes)]
    if len(owners) == 1:
        return owners[0]
    for family in FAMILIES.values():
        if family.matches_config(denoiser_config):
            return family
    return SD1


def family_from_metadata(metadata: Mapping[str, str]) -> Family | None:
    """The family a LoRA file's metadata names: ``selma.architecture`` (or ``architecture``), else
    kohya's ``ss_base_model_version`` or ModelSpec's ``modelspec.architecture``; None if none does."""
    said = metadata.get("selma.architecture") or metadata.get("architecture")
    if said in FAMILIES:
        return FAMILIES[said]
    version = metadata.get("ss_base_model_version", "")
    spec = metadata.get("modelspec.architecture", "")
    for family in FAMILIES.values():  # SDXL before SD 1/2: "stable-diffusion-xl" also starts like their names
        if version.startswith(family.kohya_version_prefixes) or spec.startswith(family.modelspec_prefixes):
            return family
    return None


def family_of_comfy_model(class_name: str) -> Family | None:
    """The family of a ComfyUI ``model_base`` class name (``SD15``, ``SDXL``...), or None."""
    for family in FAMILIES.values():
        if class_name in family.comfy_model_classes:
            return family
    return None
