"""Base-model families: what the toolkit knows about SD 1.x, SD 2.x, SDXL, SD 3, Flux, Chroma,
Qwen-Image, Z-Image and FLUX.2 [klein], one record each.

Every module that needs a family fact (which text encoders a model has, how a file's metadata
names its base, which ComfyUI model class it is, the Hub tag, the tiny test model's config) looks
the family up here instead of comparing strings:

    family = get_family("sdxl")
    family.text_encoder_components        # ("text_encoder", "text_encoder_2")
    family_from_metadata({"ss_base_model_version": "sd_v1"}).name   # "sd1"

Adding a family is one :class:`Family` record (selma_toolkit/family.py) in :data:`FAMILIES` (and,
when it trains or samples differently, one entry in train/conditioning.py): see docs/architecture.md.

Pure Python on purpose: ``selma_toolkit.lora`` and the ComfyUI pack import it, and ComfyUI may
lack diffusers, transformers and peft. Class names are strings, resolved where they are used.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from selma_toolkit.family import Family, TextEncoder, TinyConfig

__all__ = ["Family", "TextEncoder", "TinyConfig"]  # the record types, importable from here as before

_CLIP_L = dict(model_class="CLIPTextModel", comfy_clip="clip_l", hidden_size=768, layers=12)
_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# The tiny UNets share one small layout (2 blocks, 1 layer per block, 32x32 latents).
_TINY_UNET: Mapping[str, Any] = MappingProxyType(
    dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        norm_num_groups=16,
    )
)
_SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
# The UNet's block containers as block weights name them; ComfyUI Inspire's LoRA Block Weight
# vectors count its input / middle / output blocks (lora/blocks.py).
_UNET_BLOCKS = MappingProxyType({"down_blocks": "in", "mid_block": "mid", "up_blocks": "out"})
# SD 1.x / 2.x: four down and up blocks, the last down and the first up without attention.
_SD_UNET_BLOCKS = dict(
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
)


def _is_sd2_config(config: Mapping[str, Any]) -> bool:
    # SD 2.x's UNet has Linear projections in its transformers and per-block head dims; SD 1.x has neither.
    return bool(config.get("use_linear_projection")) or isinstance(config.get("attention_head_dim"), (list, tuple))


SD1 = Family(
    name="sd1",
    title="SD 1.x",
    pipeline_class="StableDiffusionPipeline",
    denoiser="unet",
    denoiser_class="UNet2DConditionModel",
    text_encoders=(TextEncoder("text_encoder", "tokenizer", kohya_prefix="lora_te_", **_CLIP_L),),
    text_hidden_layer=-1,
    pooled_and_time_ids=False,
    loss_target="scheduler",
    lora_targets=_UNET_TARGETS,
    kohya_base_version="sd_v1",
    modelspec_architecture="stable-diffusion-v1",
    resolution=512,
    hub_tag="stable-diffusion",
    comfy_model_classes=("SD15",),
    cross_attention_dim=768,
    tiny=TinyConfig(
        denoiser=MappingProxyType({**_TINY_UNET, "cross_attention_dim": 32, "attention_head_dim": 8}),
        scheduler_class="PNDMScheduler",
        scheduler=MappingProxyType({**_SD_BETAS, "skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False}),
        text_activations=("quick_gelu",),
    ),
    published_denoiser=MappingProxyType(
        dict(
            sample_size=64,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=768,
            attention_head_dim=8,
            **_SD_UNET_BLOCKS,
        )
    ),
    published_model="stable-diffusion-v1-5/stable-diffusion-v1-5",
    conv_proj_in=True,
    kohya_version_prefixes=("sd_v1",),
    modelspec_prefixes=("stable-diffusion-v1",),
    extra_pipeline_classes=("StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline"),
    block_groups=_UNET_BLOCKS,
    block_vector=True,
)

SD2 = Family(
    name="sd2",
    title="SD 2.x",
    pipeline_class="StableDiffusionPipeline",
    denoiser="unet",
    denoiser_class="UNet2DConditionModel",
    text_encoders=(
        TextEncoder("text_encoder", "tokenizer", "CLIPTextModel", "lora_te_", "clip_h", hidden_size=1024, layers=23),
    ),
    text_hidden_layer=-1,
    pooled_and_time_ids=False,
    loss_target="scheduler",
    lora_targets=_UNET_TARGETS,
    kohya_base_version="sd_v2",
    modelspec_architecture="stable-diffusion-v2-768-v",
    resolution=768,
    hub_tag="stable-diffusion",
    comfy_model_classes=("SD20",),
    cross_attention_dim=1024,
    tiny=TinyConfig(
        denoiser=MappingProxyType(
            {**_TINY_UNET, "cross_attention_dim": 32, "attention_head_dim": (2, 4), "use_linear_projection": True}
        ),
        scheduler_class="EulerDiscreteScheduler",
        scheduler=MappingProxyType(
            {**_SD_BETAS, "steps_offset": 1, "prediction_type": "v_prediction", "timestep_spacing": "leading"}
        ),
        text_activations=("gelu",),
    ),
    published_denoiser=MappingProxyType(
        dict(
            sample_size=96,
            block_out_channels=(320, 640, 1280, 1280),
            layers_per_block=2,
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
            upcast_attention=True,
            **_SD_UNET_BLOCKS,
        )
    ),
    published_model="stabilityai/stable-diffusion-2-1",
    matches_config=_is_sd2_config,
    kohya_version_prefixes=("sd_v2",),
    modelspec_prefixes=("stable-diffusion-v2",),
    block_groups=_UNET_BLOCKS,
    block_vector=True,
)

SDXL = Family(
    name="sdxl",
    title="SDXL",
    pipeline_class="StableDiffusionXLPipeline",
    denoiser="unet",
    denoiser_class="UNet2DConditionModel",
    text_encoders=(
        TextEncoder("text_encoder", "tokenizer", kohya_prefix="lora_te1_", **_CLIP_L),
        TextEncoder(
            "text_encoder_2",
            "tokenizer_2",
            "CLIPTextModelWithProjection",
            "lora_te2_",
            "clip_g",
            hidden_size=1280,
            layers=32,
        ),
    ),
    text_hidden_layer=-2,
    pooled_and_time_ids=True,
    loss_target="scheduler",
    lora_targets=_UNET_TARGETS,
    kohya_base_version="sdxl_base_v1-0",
    modelspec_architecture="stable-diffusion-xl-v1-base",
    resolution=1024,
    hub_tag="sdxl",
    comfy_model_classes=("SDXL",),
    cross_attention_dim=2048,
    tiny=TinyConfig(
        denoiser=MappingProxyType(
            {
                **_TINY_UNET,
                "cross_attention_dim": 64,  # the two text encoders' hidden states, concatenated (32 + 32)
                "attention_head_dim": (2, 4),
                "use_linear_projection": True,
                "addition_embed_type": "text_time",
                "addition_time_embed_dim": 8,
                "transformer_layers_per_block": (1, 2),
                "projection_class_embeddings_input_dim": 6 * 8 + 32,  # six time ids + pooled text (32)
            }
        ),
        scheduler_class="EulerDiscreteScheduler",
        scheduler=MappingProxyType({**_SD_BETAS, "steps_offset": 1, "timestep_spacing": "leading"}),
        text_activations=("gelu", "gelu"),
    ),
    published_denoiser=MappingProxyType(
        dict(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            layers_per_block=2,
            cross_attention_dim=2048,
            attention_head_dim=(5, 10, 20),
            use_linear_projection=True,
            transformer_layers_per_block=(1, 2, 10),
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        )
    ),
    published_model="stabilityai/stable-diffusion-xl-base-1.0",
    # The second text encoder and the added (pooled text + time ids) embedding exist only in SDXL.
    module_prefixes=("text_encoder_2.", "unet.add_embedding."),
    stacked_transformer_blocks=True,
    matches_config=lambda config: config.get("addition_embed_type") == "text_time",
    kohya_version_prefixes=("sdxl",),
    modelspec_prefixes=("stable-diffusion-xl",),
    extra_pipeline_classes=("StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"),
    block_groups=_UNET_BLOCKS,
    block_vector=True,
)

# The DiT families: joint (double-stream) attention has the text stream's projections beside the image's.
_JOINT_ATTENTION_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_T5_XXL = dict(model_class="T5EncoderModel", comfy_clip="t5xxl", hidden_size=4096, layers=24, kind="t5")
# A tiny T5 (2 layers, 4 heads); d_model is the transformer's joint_attention_dim.
_TINY_T5 = dict(
    d_ff=64,
    d_kv=8,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
)
_FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
# FLUX.1's VAE (also Chroma's and Z-Image's): 16 latent channels, shift factor, no quant convs.
_FLUX_VAE = MappingProxyType(
    dict(scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
)
# The resolution-dependent shift of Flux-type schedulers (FLUX.1-dev's scheduler config; Chroma's too).
_DYNAMIC_SHIFT = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
# Flux-type block weights: diffusers' transformer_blocks are BFL's (and ComfyUI's) double_blocks.
_FLUX_BLOCKS = MappingProxyType({"transformer_blocks": "double", "single_transformer_blocks": "single"})

SD3 = Family(
    name="sd3",
    title="SD 3",
    pipeline_class="StableDiffusion3Pipeline",
    denoiser="transformer",
    denoiser_class="SD3Transformer2DModel",
    text_encoders=(
        TextEncoder(
            "text_encoder",
            "tokenizer",
            "CLIPTextModelWithProjection",
            "lora_te1_",
            "clip_l",
            hidden_size=768,
            layers=12,
        ),
        TextEncoder(
            "text_encoder_2",
            "tokenizer_2",
            "CLIPTextModelWithProjection",
            "lora_te2_",
            "clip_g",
            hidden_size=1280,
            layers=32,
        ),
        TextEncoder("text_encoder_3", "tokenizer_3", kohya_prefix="lora_te3_", max_length=256, **_T5_XXL),
    ),
    text_hidden_layer=-2,
    pooled_and_time_ids=False,
    loss_target="flow",
    lora_targets=_JOINT_ATTENTION_TARGETS,
    kohya_base_version="sd3",
    modelspec_architecture="stable-diffusion-3-medium",
    resolution=1024,
    hub_tag="sd3",
    comfy_model_classes=("SD3",),
    cross_attention_dim=4096,
    tiny=TinyConfig(
        denoiser=MappingProxyType(
            dict(
                sample_size=16,
                patch_size=2,
                in_channels=4,
                out_channels=4,
                num_layers=2,
                attention_head_dim=8,
                num_attention_heads=4,
                joint_attention_dim=64,  # the T5 width; the two CLIPs' 32 + 32 are padded to it
                caption_projection_dim=32,
                pooled_projection_dim=64,
                pos_embed_max_size=32,  # pooled: 32 + 32
            )
        ),
        scheduler_class=_FLOW_SCHEDULER,
        scheduler=MappingProxyType(dict(num_train_timesteps=1000, shift=3.0)),
        text_activations=("gelu", "gelu", "t5"),
        t5=MappingProxyType({**_TINY_T5, "d_model": 64}),
        vae=MappingProxyType(
            dict(scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
        ),
    ),
    published_denoiser=MappingProxyType(
        dict(
            sample_size=128,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=24,
            attention_head_dim=64,
            num_attention_heads=24,
            joint_attention_dim=4096,
            caption_projection_dim=1536,
            pooled_projection_dim=2048,
            pos_embed_max_size=192,
        )
    ),
    published_model="stabilityai/stable-diffusion-3-medium-diffusers",
    conditioning="mmdit",
    denoiser_widths=(1536, 2432),
    pooled_width=2048,
    module_prefixes=("text_encoder_3.", "transformer.pos_embed."),
    matches_config=lambda config: "pos_embed_max_size" in config or "caption_projection_dim" in config,
    kohya_version_prefixes=("sd3",),
    modelspec_prefixes=("stable-diffusion-3",),
    extra_pipeline_classes=("StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline"),
    # diffusers' SD 3 loader reads no kohya names: transformer.<diffusers path> is what both read.
    layouts=("peft",),
    block_groups=MappingProxyType({"transformer_blocks": "transformer_blocks"}),
)

FLUX = Family(
    name="flux",
    title="Flux",
    pipeline_class="FluxPipeline",
    denoiser="transformer",
    denoiser_class="FluxTransformer2DModel",
    text_encoders=(
        TextEncoder("text_encoder", "tokenizer", kohya_prefix="lora_te1_", **_CLIP_L),
        # kohya's Flux scripts name the T5 lora_te3_, OneTrainer lora_te2_; ComfyUI maps both. lora_te2_ here,
        # so that a prefix names one component over every family (SD 3's lora_te3_ is its third encoder).
        TextEncoder("text_encoder_2", "tokenizer_2", kohya_prefix="lora_te2_", max_length=512, **_T5_XXL),
    ),
    text_hidden_layer=-1,
    pooled_and_time_ids=False,
    loss_target="flow",
    lora_targets=_JOINT_ATTENTION_TARGETS,
    kohya_base_version="flux1",
    modelspec_architecture="flux-1-dev",
    resolution=1024,
    hub_tag="flux",
    comfy_model_classes=("Flux", "FluxSchnell", "FluxInpaint"),
    cross_attention_dim=4096,
    tiny=TinyConfig(
        denoiser=MappingProxyType(
            dict(
                patch_size=1,
                in_channels=16,  # 4 latent channels packed 2x2, as FluxPipeline._pack_latents does
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=32,
                pooled_projection_dim=32,
                guidance_embeds=True,
                axes_dims_rope=(4, 4, 8),
            )
        ),
        scheduler_class=_FLOW_SCHEDULER,
        scheduler=MappingProxyType(_DYNAMIC_SHIFT),
        text_activations=("quick_gelu", "t5"),
        t5=MappingProxyType({**_TINY_T5, "d_model": 32}),
        vae=_FLUX_VAE,
    ),
    published_denoiser=MappingProxyType(
        dict(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            pooled_projection_dim=768,
            guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        )
    ),
    published_model="black-forest-labs/FLUX.1-dev",
    conditioning="packed",
    denoiser_widths=(3072,),
    pooled_width=768,
    # The guidance embedding beside the pooled text embedding exists only in FLUX.1-dev.
    module_prefixes=("transformer.time_text_embed.guidance_embedder.",),
    matches_config=lambda config: "num_single_layers" in config and "pooled_projection_dim" in config,
    kohya_version_prefixes=("flux",),
    modelspec_prefixes=("flux-1",),
    extra_pipeline_classes=("FluxImg2ImgPipeline", "FluxInpaintPipeline"),
    # ComfyUI maps transformer.<diffusers path> through flux_to_diffusers (q/k/v slices of its fused
    # layers included), diffusers reads it natively; ai-toolkit writes it for FLUX.1 too.
    layouts=("peft",),
    negative_prompt=False,
    block_groups=_FLUX_BLOCKS,
    block_vector=True,
)

# Chroma (lodestones' Flux-schnell derivative): T5 only, with its attention mask, no pooled text,
# its modulation from a distilled guidance network instead of per-block norm1.linear.
CHROMA = Family(
    name="chroma",
    title="Chroma",
    pipeline_class="ChromaPipeline",
    denoiser="transformer",
    denoiser_class="ChromaTransformer2DModel",
    text_encoders=(TextEncoder("text_encoder", "tokenizer", kohya_prefix="lora_te_", max_length=512, **_T5_XXL),),
    text_hidden_layer=-1,
    pooled_and_time_ids=False,
    loss_target="flow",
    lora_targets=_JOINT_ATTENTION_TARGETS,
    kohya_base_version="chroma",
    modelspec_architecture="chroma",
    resolution=1024,
    hub_tag="chroma",
    comfy_model_classes=("Chroma",),
    cross_attention_dim=4096,
    tiny=TinyConfig(
        denoiser=MappingProxyType(
            dict(
                patch_size=1,
                in_channels=16,
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=32,
                axes_dims_rope=(4, 4, 8),
                approximator_hidden_dim=32,
                approximator_layers=1,
                approximator_num_channels=16,
            )
        ),
        scheduler_class=_FLOW_SCHEDULER,
        scheduler=MappingProxyType(_DYNAMIC_SHIFT),
        text_activations=("t5",),
        t5=MappingProxyType({**_TINY_T5, "d_model": 32}),
        vae=_FLUX_VAE,
    ),
    published_denoiser=MappingProxyType(
        dict(
            patch_size=1,
            in_channels=64,
            num_layers=19,
            num_single_layers=38,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=4096,
            axes_dims_rope=(16, 56, 56),
            approximator_num_channels=64,
            approximator_hidden_dim=5120,
            approximator_layers=5,
        )
    ),
    published_model="lodestones/Chroma1-HD",
    conditioning="packed-mask",
    denoiser_widths=(3072,),
    module_prefixes=("transformer.distilled_guidance_layer.",),
    matches_config=lambda config: config.get("_class_name") == "ChromaTransformer2DModel",
    kohya_version_prefixes=("chroma",),
    modelspec_prefixes=("chroma",),
    extra_pipeline_classes=("ChromaImg2ImgPipeline", "ChromaInpaintPipeline"),
    # ComfyUI's Chroma model is a Flux model: transformer.<diffusers path> maps as for Flux.
    layouts=("peft",),
    block_groups=_FLUX_BLOCKS,
    block_vector=True,
)

# The chat language models the newer families read prompts with (their hidden states).
_QWEN3_4B = dict(kind="qwen3", comfy_clip="qwen3_4b", hidden_size=2560, layers=36, max_length=512)

# Qwen-Image: Qwen2.5-VL-7B's last hidden states (its 34-token system prompt dropped), one MMDiT
# stream pair per block, a video VAE (one frame) with per-channel latent statistics, true CFG.
QWEN_IMAGE = Family(
    name="qwen-image",
    title="Qwen-Image",
    pipeline_class="QwenImagePipeline",
    denoiser="transformer",
    denoiser_class="QwenImageTransformer2DModel",
    text_encoders=(
        TextEncoder(
            "text_encoder",
            "tokenizer",
            "Qwen2_5_VLForConditionalGeneration",
            "lora_te_",
            "qwen25_7b",
            hidden_size=3584,
            layers=28,
            kind="qwen2.5-vl",
            max_length=512,
        ),
    ),
    text_hidden_layer=-1,
    pooled_and_time_ids=False,
    loss_target="flow",
    lora_targets=_JOINT_ATTENTION_TARGETS,
    kohya_base_version="qwen_image",
    modelspec_architecture="qwen-image",
    resolution=1328,
    hub_tag="qwen-image",
    comfy_model_classes=("QwenImage",),
    cross_attention_dim=3584,
    tiny=TinyConfig(
        denoiser=MappingProxyType(
            dict(
                patch_size=2,
                in_channels=16,
                out_channels=4,
                num_layers=2,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=16,
                guidance_embeds=False,
                axes_dims_rope=(8, 4, 4),
            )
        ),
        scheduler_class=_FLOW_SCHEDULER,
        # Qwen-Image's own scheduler config: exponential time shift with a terminal sigma.
        scheduler=MappingProxyType(
            dict(
                num_train_timesteps=1000,
                shift=1.0,
                use_dynamic_shifting=True,
                base_shift=0.5,
                max_shift=0.9,
                base_image_seq_len=256,
                max_image_seq_len=8192,
                shift_terminal=0.02,
                time_shift_type="exponential",
            )
        ),
        text_activations=("qwen",),
        # A 4-channel video VAE that downsamples by 4; latent statistics that are not the identity.
        # (Lists: the class concatenates them with lists.)
        vae=MappingProxyType(
            dict(
                base_dim=8,
                z_dim=4,
                dim_mult=[1, 2, 2],
                num_res_blocks=1,
                temperal_downsample=[False, True],
                latents_mean=[0.1, -0.2, 0.05, 0.3],
                latents_std=[0.8, 1.2, 1.5, 0.9],
            )
        ),
        language_model=MappingProxyType(
            dict(
                text_config=dict(
                    hidden_size=16,
                    intermediate_size=32,
                    num_hidden_layers=2,
                    num_attention_heads=2,
                    num_key_value_heads=2,
                    rope_theta=1000000.0,
                    rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                ),
                vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
            )
        ),
    ),
    published_denoiser=MappingProxyType(
        dict(
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=60,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=3584,
            guidance_embeds=False,
            axes_dims_rope=(16, 56, 56),
        )
    ),
    published_model="Qwen/Qwen-Image",
    conditioning="qwen-vl",
    denoiser_widths=(3072,),
    module_prefixes=("transformer.img_in", "transformer.txt_in", "transformer.txt_norm"),
    matches_config=lambda config: config.get("_class_name") == "QwenImageTransformer2DModel",
    kohya_version_prefixes=("qwen_image", "qwen-image"),
    modelspec_prefixes=("qwen-image",),
    extra_pipeline_classes=("QwenImageImg2ImgPipeline", "QwenImageInpaintPipeline"),
    # ai-toolkit's layout; diffusers reads it (_convert_non_diffusers_qwen_lora_to_diffusers), ComfyUI
    # 0.3.64's QwenImage key map takes diffusion_model.<its own names>, which are diffusers'.
    layouts=("ai-toolkit", "peft"),
    guidance_argument="true_cfg_scale",
    default_negative_prompt=" ",
    vae_class="AutoencoderKLQwenImage",
    latents="per-channel",
    block_groups=MappingProxyType({"transformer_blocks": "transformer_blocks"}),
)

# Z-Image: Qwen3-4B's penultimate hidden states of the chat-formatted prompt (padding dropped),
# a single-stream DiT with noise / context refiners, the Flux VAE; it predicts x0 - noise.
Z_IMAGE = Family(
    name="z-image",
    title="Z-Image",
    pipeline_class="ZImagePipeline",
    denoiser="transformer",
    denoiser_class="ZImageTransformer2DModel",
    text_encoders=(TextEncoder("text_encoder", "tokenizer", "Qwen3Model", "lora_te_", **_QWEN3_4B),),
    text_hidden_layer=-2,
    pooled_and_time_ids=False,
    loss_target="flow",
    lora_targets=("to_q", "to_k", "to_v", "to_out.0"),
    kohya_base_version="z_image",
    modelspec_architecture="z-image",
    resolution=1024,
    hub_tag="z-image",
    comfy_model_classes=("Lumina2",),
    cross_attention_dim=2560,
    tiny=TinyConfig(
        denoiser=MappingProxyType(
            dict(
                all_patch_size=(2,),
                all_f_patch_size=(1,),
                in_channels=4,
                dim=32,
                n_layers=2,
                n_refiner_layers=1,
                n_heads=2,
                n_kv_heads=2,
                norm_eps=1e-5,
                qk_norm=True,
                cap_feat_dim=16,
                rope_theta=256.0,
                t_scale=1000.0,
                axes_dims=(8, 4, 4),
                axes_lens=(256, 32, 32),
            )
        ),
        scheduler_class=_FLOW_SCHEDULER,
        scheduler=MappingProxyType(dict(num_train_timesteps=1000, shift=3.0)),
        text_activations=("qwen",),
        vae=_FLUX_VAE,
        language_model=MappingProxyType(
            dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                head_dim=8,
            )
        ),
        seeded_parameters=("x_pad_token", "cap_pad_token"),
    ),
    published_denoiser=MappingProxyType(
        dict(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=16,
            dim=3840,
            n_layers=30,
            n_refiner_layers=2,
            n_heads=30,
            n_kv_heads=30,
            norm_eps=1e-5,
            qk_norm=True,
            cap_feat_dim=2560,
            rope_theta=256.0,
            t_scale=1000.0,
            axes_dims=(32, 48, 48),
            axes_lens=(1536, 512, 512),
        )
    ),
    published_model="Tongyi-MAI/Z-Image",  # Z-Image-Turbo, its distilled model, has the same config
    conditioning="qwen3-list",
    denoiser_widths=(3840,),
    module_prefixes=("transformer.layers.", "transformer.noise_refiner.", "transformer.context_refiner."),
    matches_config=lambda config: config.get("_class_name") == "ZImageTransformer2DModel",
    kohya_version_prefixes=("z_image", "z-image"),
    modelspec_prefixes=("z-image",),
    extra_pipeline_classes=("ZImageImg2ImgPipeline", "ZImageInpaintPipeline"),
    # ai-toolkit writes diffusion_model.<diffusers path>; diffusers reads it
    # (_convert_non_diffusers_z_image_lora_to_diffusers); ComfyUI maps it to its fused qkv
    # (comfy/utils.py z_image_to_diffusers, comfy/lora.py's Lumina2 branch: newer than 0.3.64).
    layouts=("ai-toolkit", "peft"),
    block_groups=MappingProxyType(
        {"layers": "layers", "noise_refiner": "noise_refiner", "context_refiner": "context_refiner"}
    ),
)

# FLUX.2 [klein]: Qwen3's hidden states of layers 9, 18 and 27 side by side, double blocks with
# shared modulation, single blocks with one fused q/k/v/MLP projection, a VAE whose 2x2-patchified
# latents are normalised by its batch-norm statistics.
FLUX2_KLEIN = Family(
    name="flux2-klein",
    title="FLUX.2 [klein]",
    pipeline_class="Flux2KleinPipeline",
    denoiser="transformer",
    denoiser_class="Flux2Transformer2DModel",
    text_encoders=(TextEncoder("text_encoder", "tokenizer", "Qwen3ForCausalLM", "lora_te_", **_QWEN3_4B),),
    text_hidden_layer=-1,
    pooled_and_time_ids=False,
    loss_target="flow",
    # diffusers' train_dreambooth_lora_flux2_klein.py trains the single blocks' fused projection and
    # attn.to_out too (the double blocks' attn.to_out is a ModuleList: only Linear layers match).
    lora_targets=(*_JOINT_ATTENTION_TARGETS, "to_qkv_mlp_proj", "attn.to_out"),
    kohya_base_version="flux2_klein",
    modelspec_architecture="flux-2-klein-4b",
    resolution=1024,
    hub_tag="flux2",
    comfy_model_classes=("Flux2",),
    cross_attention_dim=7680,
    tiny=TinyConfig(
        denoiser=MappingProxyType(
            dict(
                patch_size=1,
                in_channels=16,
                num_layers=1,
                num_single_layers=1,
                attention_head_dim=16,
                num_attention_heads=2,
                joint_attention_dim=48,  # three hidden states of the 16-wide Qwen3
                timestep_guidance_channels=32,
                axes_dims_rope=(4, 4, 4, 4),
                guidance_embeds=False,
            )
        ),
        scheduler_class=_FLOW_SCHEDULER,
        scheduler=MappingProxyType(_DYNAMIC_SHIFT),
        text_activations=("qwen",),
        vae=MappingProxyType(
            dict(
                block_out_channels=(32, 64),
                down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2,
                layers_per_block=1,
                latent_channels=4,
                norm_num_groups=16,
                sample_size=64,
                use_quant_conv=False,
                use_post_quant_conv=False,
            )
        ),
        # 28 layers: the pipeline stacks hidden states 9, 18 and 27 (text_encoder_out_layers' default).
        language_model=MappingProxyType(
            dict(
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=28,
                num_attention_heads=2,
                num_key_value_heads=2,
                head_dim=8,
            )
        ),
        seeded_vae_buffers=MappingProxyType({"bn.running_mean": "mean", "bn.running_var": "var"}),
    ),
    published_denoiser=MappingProxyType(
        dict(
            patch_size=1,
            in_channels=128,
            num_layers=5,
            num_single_layers=20,
            attention_head_dim=128,
            num_attention_heads=24,
            joint_attention_dim=7680,
            timestep_guidance_channels=256,
            mlp_ratio=3.0,
            axes_dims_rope=(32, 32, 32, 32),
            rope_theta=2000,
            eps=1e-6,
            guidance_embeds=False,
        )
    ),
    published_model="black-forest-labs/FLUX.2-klein-base-4B",
    conditioning="flux2",
    denoiser_widths=(3072,),
    module_prefixes=(
        "transformer.double_stream_modulation",
        "transformer.single_stream_modulation",
        "transformer.time_guidance_embed.",
    ),
    matches_config=lambda config: config.get("_class_name") == "Flux2Transformer2DModel",
    kohya_version_prefixes=("flux2",),
    modelspec_prefixes=("flux-2",),
    extra_pipeline_classes=("Flux2Pipeline",),
    # ai-toolkit and ComfyUI name FLUX.2 as BFL does (double_blocks.N.img_attn.qkv: q/k/v fused);
    # diffusers reads diffusion_model.<BFL path> (_convert_non_diffusers_flux2_lora_to_diffusers).
    layouts=("ai-toolkit", "peft"),
    native_names="bfl-flux2",
    negative_prompt=False,
    vae_class="AutoencoderKLFlux2",
    latents="batch-norm",
    block_groups=_FLUX_BLOCKS,
    block_vector=True,
)

# Order matters where clues overlap: a config is tested against the families in this order, and
# the first family without a config rule (SD 1.x) is what a plain UNet config is.
FAMILIES: Mapping[str, Family] = MappingProxyType(
    {family.name: family for family in (FLUX2_KLEIN, CHROMA, QWEN_IMAGE, Z_IMAGE, FLUX, SD3, SDXL, SD2, SD1)}
)
# In the order people list them.
FAMILY_NAMES: tuple[str, ...] = ("sd1", "sd2", "sdxl", "sd3", "flux", "chroma", "qwen-image", "z-image", "flux2-klein")
# The model parts LoRA trains in each kind of family (the UNet, or the DiT families' transformer).
DENOISERS: tuple[str, ...] = tuple(dict.fromkeys(FAMILIES[name].denoiser for name in FAMILY_NAMES))
# Every model part a LoRA of any family may adapt, in a stable order.
COMPONENTS: tuple[str, ...] = tuple(dict.fromkeys(c for name in FAMILY_NAMES for c in FAMILIES[name].components))
# How LoRA files spell a text encoder -> our component, over every family. kohya's lora_te_
# (one encoder) and lora_te1_ both mean the first one; ComfyUI's clip_l / clip_h are the first, clip_g the second.
KOHYA_TEXT_PREFIXES: tuple[tuple[str, str], ...] = tuple(
    sorted(
        {(encoder.kohya_prefix, encoder.component) for family in FAMILIES.values() for encoder in family.text_encoders},
        key=lambda item: (-len(item[0]), item[0]),
    )
)
# ComfyUI's text-encoder names that mean one component in every family: t5xxl is SD 3's third
# encoder but Flux's second, so it is left out (files are read as ``text_encoders.<name>...``).
_COMFY_CLIPS = {
    (encoder.comfy_clip, encoder.component) for family in FAMILIES.values() for encoder in family.text_encoders
}
COMFY_CLIP_COMPONENTS: Mapping[str, str] = MappingProxyType(
    {clip: component for clip, component in sorted(_COMFY_CLIPS) if sum(c == clip for c, _ in _COMFY_CLIPS) == 1}
)


def get_family(name: str) -> Family:
    """The family named ``name`` (sd1, sd2, ... flux2-klein: ``FAMILY_NAMES``); ValueError naming the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"architecture {name!r}: expected one of {', '.join(FAMILY_NAMES)}") from None


def family_titles() -> str:
    """The families for a message: "SD 1.x, SD 2.x, SDXL, SD 3, Flux, ... or FLUX.2 [klein]"."""
    titles = [FAMILIES[name].title for name in FAMILY_NAMES]
    return ", ".join(titles[:-1]) + " or " + titles[-1]


def family_of_pipeline(pipeline_class: str, denoiser_config: Mapping[str, Any]) -> Family:
    """The family of a diffusers model from its ``model_index.json`` class name and its denoiser's
    config: a pipeline class only one family uses decides; otherwise the config's shape rules
    (tested in :data:`FAMILIES` order), and SD 1.x when none matches."""
    owners = [
        family
        for family in FAMILIES.values()
        if pipeline_class in (family.pipeline_class, *family.extra_pipeline_classes)
    ]
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
