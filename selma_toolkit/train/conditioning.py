"""How each DiT family's transformer is conditioned and called in training: captions encoded as
its pipeline encodes them, latents normalised as its pipeline normalises them, and the velocity
prediction of the rectified-flow loss, one entry per ``Family.conditioning`` in :data:`FLOW_MODELS`.

The captions go through the pipelines' own encoding helpers (a pipeline object holding only the
tokenizer and the text encoder), so an expert trains on exactly what it sees at inference:

* ``mmdit`` (SD 3): both CLIPs' penultimate states side by side, zero-padded to T5's width, then T5's
  states along the sequence; both CLIPs' pooled projections.
* ``packed`` (Flux): T5's last states and CLIP-L's pooled output.
* ``packed-mask`` (Chroma): T5's states with their attention mask (every token but the first padding one masked).
* ``qwen-vl`` (Qwen-Image): Qwen2.5-VL's last states of the templated prompt, the template's 34 tokens dropped,
  with the mask of the prompt's own tokens.
* ``qwen3-list`` (Z-Image): Qwen3's penultimate states of the chat-formatted prompt, padding dropped (kept here
  as padding plus a mask, since a cache row needs one shape; the transformer gets them unpadded).
* ``flux2`` (FLUX.2 [klein]): Qwen3's hidden states 9, 18 and 27 side by side, padded to 512 tokens, no mask.

Variable lengths are padded (zeros, mask 0) to the longest of a batch; ``train/cache.py`` pads
rows of different shards the same way. The predictions are velocities (target noise - x0) in the
latent layout ``[n, C, h, w]`` of the VAE: each entry packs, patchifies or lists the latents as
its pipeline does and undoes it after the transformer (Z-Image's transformer predicts x0 - noise,
so its output is negated, as diffusers' train_dreambooth_lora_z_image.py does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from selma_toolkit.architectures import Family

TextEncoding = dict[str, torch.Tensor]  # prompt_embeds [n, L, D]; pooled [n, P]; text_mask [n, L]


@dataclass
class Conditioning:
    """What the denoiser is conditioned on, for a batch of n samples.

    latent_mean / latent_std [n, C, h, w]: the VAE's latent distribution (unscaled), sampled per
    step as the diffusers scripts do; prompt_embeds [n, L, D]; SDXL and SD 3 / Flux: pooled [n, P];
    SDXL only: time_ids [n, 6] (original size, crop top-left, target size); the families with a
    text mask (Chroma, Qwen-Image, Z-Image): text_mask [n, L], 1 for tokens the transformer attends to.
    """

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None


@dataclass(frozen=True)
class LatentScale:
    """The denoiser's latents from the VAE's: x0 = (z - shift) * scale. ``shift`` and ``scale`` are
    scalars (scaling and shift factors), per channel [C, 1, 1] (Qwen-Image's latents_mean and
    1 / latents_std) or per channel and 2x2 position [C, 2, 2] (FLUX.2: the batch-norm statistics of
    its 2x2-patchified latents, patch channel c * 4 + 2 dy + dx), tiled over the latent grid."""

    shift: torch.Tensor
    scale: torch.Tensor

    def apply(self, latents: torch.Tensor) -> torch.Tensor:
        shift, scale = self.shift.to(latents), self.scale.to(latents)
        if shift.dim() == 3 and shift.shape[1:] != (1, 1):
            repeats = (1, latents.shape[-2] // shift.shape[1], latents.shape[-1] // shift.shape[2])
            shift, scale = shift.repeat(*repeats), scale.repeat(*repeats)
        return (latents - shift) * scale


def normalise_latents(latents: torch.Tensor, latent_scale: LatentScale | tuple[float, float]) -> torch.Tensor:
    """``latents`` as the denoiser sees them, from a :class:`LatentScale` or a (scale, shift) pair."""
    if isinstance(latent_scale, LatentScale):
        return latent_scale.apply(latents)
    scale, shift = latent_scale
    return (latents - shift) * scale


# ------------------------------------------------------------------------------------- encoding


def _text_pipeline(family: Family, tokenizers: list, encoders: list):
    """The family's pipeline holding only its tokenizer and text encoder: its encoding helpers run
    as they do at inference (the other components are None, so nothing else is built)."""
    import diffusers

    return getattr(diffusers, family.pipeline_class)(
        scheduler=None, vae=None, transformer=None, text_encoder=encoders[0], tokenizer=tokenizers[0]
    )


def padded(tensors: list[torch.Tensor]) -> TextEncoding:
    """Variable-length prompt states [L_i, D] -> prompt_embeds [n, max L, D] (zeros after each) and
    text_mask [n, max L] (1 on each prompt's own tokens)."""
    length = max(t.shape[0] for t in tensors)
    embeds = torch.stack([torch.cat([t, t.new_zeros(length - t.shape[0], t.shape[1])]) for t in tensors])
    mask = torch.stack([(torch.arange(length) < t.shape[0]).long() for t in tensors]).to(embeds.device)
    return {"prompt_embeds": embeds, "text_mask": mask}


def _encode_clip_t5(family: Family, tokenizers: list, encoders: list, texts: list[str], device) -> TextEncoding:
    """SD 3 and Flux, as their pipelines' ``encode_prompt`` (module docstring)."""
    import torch.nn.functional as F

    clip_states, pooled, t5_states = [], [], None
    for spec, tokenizer, encoder in zip(family.text_encoders, tokenizers, encoders, strict=True):
        ids = tokenizer(
            texts, padding="max_length", max_length=spec.max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        if spec.kind == "t5":
            t5_states = encoder(ids)[0]
        elif family.conditioning == "packed":
            pooled.append(encoder(ids, output_hidden_states=False).pooler_output)
        else:
            output = encoder(ids, output_hidden_states=True)
            pooled.append(output[0])  # CLIPTextModelWithProjection: text_embeds
            clip_states.append(output.hidden_states[family.text_hidden_layer])
    if family.conditioning == "packed":
        return {"prompt_embeds": t5_states, "pooled": pooled[0]}
    clip = torch.cat(clip_states, dim=-1)
    clip = F.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))
    return {"prompt_embeds": torch.cat([clip, t5_states], dim=-2), "pooled": torch.cat(pooled, dim=-1)}


def _encode_chroma(family: Family, tokenizers: list, encoders: list, texts: list[str], device) -> TextEncoding:
    pipe = _text_pipeline(family, tokenizers, encoders)
    embeds, mask = pipe._get_t5_prompt_embeds(
        texts, max_sequence_length=family.text_encoders[0].max_length, device=device, dtype=encoders[0].dtype
    )
    return {"prompt_embeds": embeds, "text_mask": mask.long()}


def _encode_qwen_image(family: Family, tokenizers: list, encoders: list, texts: list[str], device) -> TextEncoding:
    pipe = _text_pipeline(family, tokenizers, encoders)
    embeds, mask = pipe._get_qwen_prompt_embeds(texts, device=device, dtype=encoders[0].dtype)
    length = family.text_encoders[0].max_length  # QwenImagePipeline.__call__'s max_sequence_length
    return {"prompt_embeds": embeds[:, :length], "text_mask": mask[:, :length].long()}


def _encode_z_image(family: Family, tokenizers: list, encoders: list, texts: list[str], device) -> TextEncoding:
    pipe = _text_pipeline(family, tokenizers, encoders)
    states = pipe._encode_prompt(list(texts), device=device, max_sequence_length=family.text_encoders[0].max_length)
    return padded(states)


def _encode_flux2(family: Family, tokenizers: list, encoders: list, texts: list[str], device) -> TextEncoding:
    from diffusers import Flux2KleinPipeline

    embeds = Flux2KleinPipeline._get_qwen3_prompt_embeds(
        encoders[0], tokenizers[0], list(texts), device=device, max_sequence_length=family.text_encoders[0].max_length
    )
    return {"prompt_embeds": embeds}


# ----------------------------------------------------------------------------------- prediction


def _unpack_2x2(packed: torch.Tensor, n: int, channels: int, height: int, width: int) -> torch.Tensor:
    """[n, (h/2)(w/2), 4C] -> [n, C, h, w]: the inverse of Flux's and Qwen-Image's ``_pack_latents``."""
    packed = packed.view(n, height // 2, width // 2, channels, 2, 2)
    return packed.permute(0, 3, 1, 4, 2, 5).reshape(n, channels, height, width)


def _guidance(transformer, n: int, guidance: float, device) -> torch.Tensor | None:
    """The guidance embedding's input [n] for a transformer that has one (FLUX.1-dev), else None."""
    return (
        torch.full((n,), float(guidance), device=device)
        if getattr(transformer.config, "guidance_embeds", False)
        else None
    )


def _predict_mmdit(transformer, noisy, timesteps, cond: Conditioning, guidance: float) -> torch.Tensor:
    return transformer(
        hidden_states=noisy,
        timestep=timesteps,
        encoder_hidden_states=cond.prompt_embeds,
        pooled_projections=cond.pooled,
        return_dict=False,
    )[0]


def _predict_flux_type(transformer, noisy, timesteps, cond: Conditioning, guidance: float) -> torch.Tensor:
    """Flux and Chroma: latents packed 2x2 (``FluxPipeline._pack_latents``), image ids of the grid,
    zero text ids, timestep / 1000; Flux adds its pooled text and guidance, Chroma its text mask
    extended over the image tokens (``ChromaPipeline._prepare_attention_mask``)."""
    from diffusers import FluxPipeline

    n, channels, height, width = noisy.shape
    packed = FluxPipeline._pack_latents(noisy, n, channels, height, width)
    image_ids = FluxPipeline._prepare_latent_image_ids(n, height // 2, width // 2, noisy.device, noisy.dtype)
    embeds = cond.prompt_embeds
    extra = {}
    if cond.pooled is not None:
        extra.update(pooled_projections=cond.pooled, guidance=_guidance(transformer, n, guidance, noisy.device))
    if cond.text_mask is not None:
        image_tokens = torch.ones(n, packed.shape[1], device=noisy.device, dtype=torch.bool)
        extra["attention_mask"] = torch.cat([cond.text_mask.to(noisy.device, noisy.dtype), image_tokens], dim=1)
    out = transformer(
        hidden_states=packed,
        timestep=timesteps / 1000,
        encoder_hidden_states=embeds,
        txt_ids=torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
        img_ids=image_ids,
        return_dict=False,
        **extra,
    )[0]
    return _unpack_2x2(out, n, channels, height, width)


def _predict_qwen_image(transformer, noisy, timesteps, cond: Conditioning, guidance: float) -> torch.Tensor:
    """Latents packed 2x2 (``QwenImagePipeline._pack_latents``), one frame per image, timestep / 1000,
    the prompt mask (None when every token counts, as the pipeline passes it)."""
    from diffusers import QwenImagePipeline

    n, channels, height, width = noisy.shape
    packed = QwenImagePipeline._pack_latents(noisy, n, channels, height, width)
    mask = cond.text_mask
    if mask is not None and bool(mask.all()):
        mask = None
    out = transformer(
        hidden_states=packed,
        timestep=timesteps / 1000,
        guidance=_guidance(transformer, n, guidance, noisy.device),
        encoder_hidden_states=cond.prompt_embeds,
        encoder_hidden_states_mask=mask,
        img_shapes=[[(1, height // 2, width // 2)]] * n,
        return_dict=False,
    )[0]
    return _unpack_2x2(out, n, channels, height, width)


def _predict_z_image(transformer, noisy, timesteps, cond: Conditioning, guidance: float) -> torch.Tensor:
    """One [C, 1, h, w] latent per image in a list, t = (1000 - timestep) / 1000, each prompt's own
    tokens only; the output (x0 - noise) negated."""
    embeds, mask = cond.prompt_embeds, cond.text_mask
    captions = [embeds[i] if mask is None else embeds[i][mask[i].bool()] for i in range(embeds.shape[0])]
    out = transformer(list(noisy.unsqueeze(2).unbind(0)), (1000 - timesteps) / 1000, captions, return_dict=False)[0]
    return -torch.stack(out).squeeze(2)


def _predict_flux2(transformer, noisy, timesteps, cond: Conditioning, guidance: float) -> torch.Tensor:
    """Latents patchified 2x2 and packed (``Flux2KleinPipeline._patchify_latents`` / ``_pack_latents``)
    with 4-axis position ids, text ids of the prompt's length, timestep / 1000; undone after."""
    from diffusers import Flux2KleinPipeline as Pipe

    patches = Pipe._patchify_latents(noisy)
    image_ids = Pipe._prepare_latent_ids(patches).to(noisy.device)
    text_ids = Pipe._prepare_text_ids(cond.prompt_embeds).to(noisy.device)
    out = transformer(
        hidden_states=Pipe._pack_latents(patches),
        timestep=timesteps / 1000,
        guidance=_guidance(transformer, noisy.shape[0], guidance, noisy.device),
        encoder_hidden_states=cond.prompt_embeds,
        txt_ids=text_ids,
        img_ids=image_ids,
        return_dict=False,
    )[0]
    unpacked = Pipe._unpack_latents_with_ids(out, image_ids, patches.shape[2], patches.shape[3])
    return Pipe._unpatchify_latents(unpacked)


@dataclass(frozen=True)
class FlowModel:
    """One DiT family's training path: ``encode(family, tokenizers, encoders, texts, device)`` and
    ``predict(transformer, noisy [n, C, h, w], timesteps [n] (0..1000), cond, guidance)``, the
    velocity prediction in the same layout."""

    encode: Callable[..., TextEncoding]
    predict: Callable[..., torch.Tensor]


FLOW_MODELS: dict[str, FlowModel] = {
    "mmdit": FlowModel(_encode_clip_t5, _predict_mmdit),
    "packed": FlowModel(_encode_clip_t5, _predict_flux_type),
    "packed-mask": FlowModel(_encode_chroma, _predict_flux_type),
    "qwen-vl": FlowModel(_encode_qwen_image, _predict_qwen_image),
    "qwen3-list": FlowModel(_encode_z_image, _predict_z_image),
    "flux2": FlowModel(_encode_flux2, _predict_flux2),
}


def flow_model(family: Family) -> FlowModel:
    """The training path of a DiT family (its ``conditioning``)."""
    return FLOW_MODELS[family.conditioning]
