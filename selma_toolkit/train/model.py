"""The base model's parts for training: loading them with diffusers/transformers, adding peft LoRA
layers, encoding images and captions, the diffusion loss, and reading the trained LoRA back out
as :class:`selma_toolkit.lora.LoraWeights`.

Conditioning follows the diffusers pipelines exactly, so an expert is trained on what it will see
at inference: SD 1.x/2.x use the text encoder's last hidden state; SDXL concatenates the
penultimate hidden states of both text encoders, adds the pooled embedding of the second one and
the six size/crop time ids. SD 3 (``StableDiffusion3Pipeline.encode_prompt``) puts the two CLIPs'
penultimate states side by side, zero-pads them to T5's width and appends T5's states along the
sequence, with both CLIPs' pooled projections; Flux (``FluxPipeline.encode_prompt``) reads T5's
states and CLIP-L's pooled output.

The DiT families' conditioning and transformer calls (SD 3, Flux, Chroma, Qwen-Image, Z-Image,
FLUX.2 [klein]) are one entry each in ``train/conditioning.py``.

The loss is the family's (``Family.loss_target``): DDPM epsilon / v for the UNet families, and for
the DiT families rectified flow as diffusers' train_dreambooth_lora_<family>.py scripts: a sigma
from the training scheduler's own sigmas, noisy = (1 - sigma) x0 + sigma noise, target = noise - x0.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from selma_toolkit.architectures import COMPONENTS, DENOISERS, FAMILIES, Family
from selma_toolkit.config.train import UNET_TARGET_MODULES, TrainSettings
from selma_toolkit.errors import ModelError, RecipeError
from selma_toolkit.lora import LoraModule, LoraWeights, canonical_module_name
from selma_toolkit.models import hub_model_error, resolve_model
from selma_toolkit.train.conditioning import (
    Conditioning,
    LatentScale,
    TextEncoding,
    flow_model,
    normalise_latents,
)

log = logging.getLogger(__name__)

# Hub downloads: diffusers configs, tokenizers and safetensors weights only (no pickles, no
# fp16/EMA variants the loader would not use).
_TOKENIZERS = dict.fromkeys(encoder.tokenizer for family in FAMILIES.values() for encoder in family.text_encoders)
_HUB_PATTERNS = ["model_index.json", "scheduler/*", *(f"{name}/*" for name in _TOKENIZERS)] + [
    f"{part}/*.{ext}" for part in ("vae", *COMPONENTS) for ext in ("json", "safetensors")
]
_HUB_IGNORE = ["*.fp16.*", "*.bf16.*", "*non_ema*", "*.ema.*"]


def local_model_dir(spec: str, revision: str | None = None) -> Path:
    """A local diffusers folder for the base model: ``tiny:<arch>`` and folders as they are, Hub
    ids downloaded once into the Hugging Face cache (safetensors only)."""
    source = resolve_model(spec)
    path = Path(source)
    if path.is_dir():
        return path
    if source.endswith(".safetensors"):
        raise ModelError(
            f"{spec}: training needs the model as a diffusers folder, not a single-file checkpoint; convert it once "
            "with `DiffusionPipeline.from_single_file(...).save_pretrained(FOLDER)` and set base_model = FOLDER"
        )
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(source, revision=revision, allow_patterns=_HUB_PATTERNS, ignore_patterns=_HUB_IGNORE)
        )
    except Exception as exc:
        raise hub_model_error(f"{spec}: could not download the model from the Hub", exc) from None


def text_encoder_names(family: Family) -> list[str]:
    """The text-encoder subfolders of a family (two for SDXL, one for SD 1.x / 2.x)."""
    return list(family.text_encoder_components)


def load_denoiser(model_dir: Path, family: Family, dtype: torch.dtype):
    """The family's denoiser (UNet or transformer), frozen, of the diffusers class its record names."""
    import diffusers

    model_class = getattr(diffusers, family.denoiser_class)
    model = model_class.from_pretrained(model_dir, subfolder=family.denoiser, dtype=dtype, use_safetensors=True)
    model.requires_grad_(False)
    return model


def load_vae(model_dir: Path, family: Family | None = None):
    """The VAE of the family's class (AutoencoderKL unless the record names another), frozen.
    Float32 always: the SDXL VAE overflows in fp16, and with the cache it runs once per dataset."""
    import diffusers

    vae_class = getattr(diffusers, family.vae_class if family is not None else "AutoencoderKL")
    vae = vae_class.from_pretrained(model_dir, subfolder="vae", dtype=torch.float32, use_safetensors=True)
    vae.requires_grad_(False).eval()
    return vae


def load_text_encoders(model_dir: Path, family: Family, dtype: torch.dtype) -> tuple[list, list]:
    """(tokenizers, text encoders), frozen, one pair per text encoder of the family, each of the
    transformers class its record names."""
    import transformers
    from transformers import AutoTokenizer

    tokenizers, encoders = [], []
    for spec in family.text_encoders:
        model_class = getattr(transformers, spec.model_class)
        tokenizers.append(AutoTokenizer.from_pretrained(model_dir, subfolder=spec.tokenizer))
        encoder = model_class.from_pretrained(model_dir, subfolder=spec.component, dtype=dtype, use_safetensors=True)
        encoders.append(encoder.requires_grad_(False).eval())
    return tokenizers, encoders


def load_noise_scheduler(model_dir: Path, family: Family | None = None):
    """The training scheduler built from the model's own scheduler config, as in the diffusers
    scripts: DDPM (the model's betas and prediction type, epsilon or v_prediction) for the UNet
    families, FlowMatchEulerDiscreteScheduler (its sigmas, with the model's shift) for SD 3 / Flux."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    if family is not None and family.loss_target == "flow":
        return FlowMatchEulerDiscreteScheduler.from_pretrained(model_dir, subfolder="scheduler")
    return DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")


def vae_latent_scale(model_dir: Path, family: Family | None = None) -> LatentScale:
    """How the denoiser's latents come from the VAE's, read without loading the VAE (the family's
    ``latents``): scaling / shift factor from vae/config.json; Qwen-Image's per-channel
    latents_mean / latents_std; FLUX.2's batch-norm running statistics (from the VAE's weights),
    per channel of its 2x2-patchified latents (``Flux2KleinPipeline._encode_vae_image``)."""
    config = json.loads((model_dir / "vae" / "config.json").read_text())
    kind = family.latents if family is not None else "scaled"
    if kind == "per-channel":
        mean, std = torch.tensor(config["latents_mean"]), torch.tensor(config["latents_std"])
        return LatentScale(mean.view(-1, 1, 1), (1.0 / std).view(-1, 1, 1))
    if kind == "batch-norm":
        from safetensors import safe_open

        with safe_open(str(model_dir / "vae" / "diffusion_pytorch_model.safetensors"), framework="pt") as handle:
            mean, var = handle.get_tensor("bn.running_mean").float(), handle.get_tensor("bn.running_var").float()
        std = torch.sqrt(var + float(config.get("batch_norm_eps", 1e-4)))
        return LatentScale(mean.view(-1, 2, 2), (1.0 / std).view(-1, 2, 2))
    scale, shift = float(config.get("scaling_factor", 0.18215)), float(config.get("shift_factor") or 0.0)
    return LatentScale(torch.tensor(shift), torch.tensor(scale))


def _lora_config(settings: TrainSettings, targets: list[str]):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.rank,
        lora_alpha=settings.effective_alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
    )


def add_lora(model, component: str, settings: TrainSettings, targets: list[str] | None = None) -> None:
    """Add trainable peft LoRA layers to a frozen UNet / transformer or text encoder.

    The denoiser uses diffusers' ``add_adapter``, with ``targets`` (the recipe's, or its family's
    default); text encoders use ``peft.inject_adapter_in_model``
    because ``text_encoder.add_adapter()`` fails with transformers 5 and peft 0.21.
    """
    from peft import inject_adapter_in_model

    denoiser = component in DENOISERS
    field = "target_modules" if denoiser else "text_encoder_target_modules"
    if targets is None:
        targets = (
            settings.denoiser_targets(UNET_TARGET_MODULES) if denoiser else list(settings.text_encoder_target_modules)
        )
    try:
        if denoiser:
            model.add_adapter(_lora_config(settings, _adaptable_targets(model, targets)))
        else:
            inject_adapter_in_model(_lora_config(settings, targets), model)
    except ValueError as exc:
        linear = sorted(
            {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise RecipeError(
            f"train.{field} = {targets}: peft could not place LoRA layers in the {component} ({exc}); "
            f"linear layer names there include {linear[:20]}"
        ) from None


_ADAPTABLE = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv1d, torch.nn.Embedding)


def _adaptable_targets(model, targets: list[str]) -> list[str]:
    """peft's target names, each matching a module path or its tail; a name that also matches a
    container peft cannot adapt (FLUX.2's double blocks hold ``attn.to_out`` as a ModuleList, its
    single blocks as a Linear) is replaced by the full paths of the layers it matches that peft can."""
    modules = dict(model.named_modules())
    resolved: list[str] = []
    for target in targets:
        matches = [path for path in modules if path == target or path.endswith("." + target)]
        if all(isinstance(modules[path], _ADAPTABLE) for path in matches):
            resolved.append(target)
        else:
            resolved.extend(path for path in matches if isinstance(modules[path], _ADAPTABLE))
    return resolved


def trainable_parameters(model) -> dict[str, torch.Tensor]:
    """The LoRA parameters of a model (everything else is frozen), by parameter name."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def lora_weights_from_model(model, component: str) -> dict[str, LoraModule]:
    """The trained peft layers as LoraModules: lora_A -> down [r, in], lora_B -> up [out, r],
    alpha from the layer's config; names canonical (``unet.<module path>``)."""
    from peft.tuners.lora import LoraLayer

    modules = {}
    for path, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and "default" in layer.lora_A:
            modules[canonical_module_name(component, path)] = LoraModule(
                down=layer.lora_A["default"].weight.detach().float().cpu().clone(),
                up=layer.lora_B["default"].weight.detach().float().cpu().clone(),
                alpha=float(layer.lora_alpha["default"]),
            )
    return modules


def lora_weights(models: dict[str, torch.nn.Module], metadata: dict[str, str]) -> LoraWeights:
    """One LoraWeights from the trained components (``{"unet": unet, "text_encoder": te, ...}``)."""
    modules: dict[str, LoraModule] = {}
    for component, model in models.items():
        modules.update(lora_weights_from_model(model, component))
    return LoraWeights(modules=modules, metadata=metadata)


# ---------------------------------------------------------------------------------------- encoding


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor, family: Family | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """pixels [n, 3, H, W] in [-1, 1] -> (mean, std) of the latent distribution, float32, [n, C, h, w]
    (Qwen-Image's video VAE encodes one frame: [n, 3, 1, H, W] in, the frame axis dropped)."""
    frames = family is not None and family.latents == "per-channel"
    pixels = pixels.to(vae.device, torch.float32)
    distribution = vae.encode(pixels.unsqueeze(2) if frames else pixels).latent_dist
    mean, std = distribution.mean.float(), distribution.std.float()
    return (mean.squeeze(2), std.squeeze(2)) if frames else (mean, std)


def encode_texts(
    tokenizers: list, encoders: list, texts: list[str], device: torch.device | str = "cpu", *, hidden_layer: int = -1
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """captions -> (prompt_embeds [n, 77, D], pooled [n, P] or None), as the pipelines encode them.

    ``hidden_layer`` is the family's ``text_hidden_layer``: -1, the encoder's output (SD 1.x / 2.x);
    -2, the penultimate hidden state of each encoder, concatenated, with the pooled projection of
    the one that has it (SDXL). ``encoders`` may be wrapped for distributed training, so the token
    ids go to ``device``. Gradients flow when the caller enables them (trained text encoders).
    """
    hidden, pooled = [], None
    penultimate = hidden_layer == -2
    for tokenizer, encoder in zip(tokenizers, encoders):
        ids = tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        output = encoder(ids, output_hidden_states=penultimate)
        if penultimate:
            hidden.append(output.hidden_states[-2])
            if output[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds
                pooled = output[0]
        else:
            hidden.append(output[0])
    return torch.cat(hidden, dim=-1), pooled


def encode_conditioning(
    family: Family, tokenizers: list, encoders: list, texts: list[str], device: torch.device | str = "cpu"
) -> TextEncoding:
    """captions -> {prompt_embeds, pooled?, text_mask?} as the family's pipeline encodes them:
    ``encode_texts`` for the UNet families, the family's entry of ``train/conditioning.py`` otherwise."""
    if family.conditioning == "unet":
        embeds, pooled = encode_texts(tokenizers, encoders, texts, device, hidden_layer=family.text_hidden_layer)
        return {"prompt_embeds": embeds} | ({"pooled": pooled} if pooled is not None else {})
    return flow_model(family).encode(family, tokenizers, encoders, texts, device)


def encode_prompts(
    family: Family, tokenizers: list, encoders: list, texts: list[str], device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """captions -> (prompt_embeds, pooled or None): :func:`encode_conditioning` without the text mask."""
    encoded = encode_conditioning(family, tokenizers, encoders, texts, device)
    return encoded["prompt_embeds"], encoded.get("pooled")


def sdxl_time_ids(original_size: torch.Tensor, crop_top_left: torch.Tensor, resolution: int) -> torch.Tensor:
    """[n, 6] = original (h, w) + crop (top, left) + target (h, w), the SDXL size conditioning."""
    target = torch.tensor([resolution, resolution]).expand(original_size.shape[0], 2)
    return torch.cat([original_size, crop_top_left, target], dim=1).float()


# ---------------------------------------------------------------------------------------- loss


@dataclass
class Draws:
    """The random draws of a batch: timesteps [n] (int64), noise and latent_noise like the latents."""

    timesteps: torch.Tensor
    noise: torch.Tensor
    latent_noise: torch.Tensor


def draw(generators: list[torch.Generator], latent_shape: tuple[int, ...], num_train_timesteps: int) -> Draws:
    """One timestep, one noise tensor and one latent-sampling tensor per sample, each from that
    sample's own generator (see ``data.sample_generator``)."""
    timesteps, noise, latent_noise = [], [], []
    for generator in generators:
        timesteps.append(torch.randint(0, num_train_timesteps, (1,), generator=generator))
        noise.append(torch.randn(latent_shape, generator=generator))
        latent_noise.append(torch.randn(latent_shape, generator=generator))
    return Draws(torch.cat(timesteps), torch.stack(noise), torch.stack(latent_noise))


def diffusion_target(
    noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon) or the velocity (v_prediction)."""
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ModelError(
        f"scheduler prediction_type {prediction_type!r} is not supported; expected epsilon or v_prediction"
    )


def flow_noisy_and_target(
    latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified flow: (noisy = (1 - sigma) x0 + sigma noise, target velocity = noise - x0), sigma [n]."""
    sigma = sigmas.to(latents.dtype).reshape(-1, *([1] * (latents.dim() - 1)))
    return (1.0 - sigma) * latents + sigma * noise, noise - latents


def flow_sigmas(noise_scheduler, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps, sigmas) [n] of the training scheduler at the drawn indices into its
    ``num_train_timesteps`` schedule, as the diffusers scripts pick them (uniform weighting)."""
    indices = indices.cpu().long()
    return noise_scheduler.timesteps[indices].float(), noise_scheduler.sigmas[indices].float()


def diffusion_loss(
    unet,
    noise_scheduler,
    cond: Conditioning,
    draws: Draws,
    latent_scale: LatentScale | tuple[float, float],
    family: Family | None = None,
    guidance: float = 3.5,
) -> torch.Tensor:
    """The standard denoising loss: MSE between the denoiser's prediction on the noised latents and
    the target (epsilon or v of the model's scheduler; the velocity noise - x0 for the families whose
    ``loss_target`` is "flow", see :func:`flow_prediction_and_target`), averaged over the batch.
    ``guidance``: the guidance embedding's value for a transformer that has one (FLUX.1-dev)."""
    prediction, target = prediction_and_target(unet, noise_scheduler, cond, draws, latent_scale, family, guidance)
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")


def prediction_and_target(
    denoiser,
    noise_scheduler,
    cond: Conditioning,
    draws: Draws,
    latent_scale: LatentScale | tuple[float, float],
    family: Family | None = None,
    guidance: float = 3.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the denoiser's prediction, its target), each [n, C, h, w]: what ``diffusion_loss`` averages
    and Diffusion-DPO compares per sample, for the family's loss."""
    if family is not None and family.loss_target == "flow":
        return flow_prediction_and_target(denoiser, noise_scheduler, cond, draws, latent_scale, family, guidance)
    return unet_prediction_and_target(denoiser, noise_scheduler, cond, draws, latent_scale)


def unet_prediction_and_target(
    unet, noise_scheduler, cond: Conditioning, draws: Draws, latent_scale: LatentScale | tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the UNet's prediction on the noised latents, the scheduler's target: epsilon or v), each
    [n, C, h, w]."""
    device = cond.prompt_embeds.device
    mean, std = cond.latent_mean.to(device), cond.latent_std.to(device)
    latents = normalise_latents(mean + std * draws.latent_noise.to(device), latent_scale)
    noise, timesteps = draws.noise.to(device), draws.timesteps.to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    target = diffusion_target(noise_scheduler, latents, noise, timesteps)
    added = None
    if cond.pooled is not None:
        added = {"text_embeds": cond.pooled.to(device), "time_ids": cond.time_ids.to(device)}
    prediction = unet(noisy, timesteps, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=added).sample
    return prediction, target


def flow_prediction_and_target(
    transformer,
    noise_scheduler,
    cond: Conditioning,
    draws: Draws,
    latent_scale: LatentScale | tuple[float, float],
    family: Family,
    guidance: float = 3.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the transformer's velocity prediction on (1 - sigma) x0 + sigma noise, the target noise - x0),
    sigma = the training scheduler's sigma at the drawn index (``draws.timesteps``); the transformer
    called as the family's entry of ``train/conditioning.py`` calls it, in its weights' dtype."""
    device = cond.prompt_embeds.device
    mean, std = cond.latent_mean.to(device), cond.latent_std.to(device)
    latents = normalise_latents(mean + std * draws.latent_noise.to(device), latent_scale)
    timesteps, sigmas = flow_sigmas(noise_scheduler, draws.timesteps)
    timesteps, sigmas = timesteps.to(device), sigmas.to(device)
    noisy, target = flow_noisy_and_target(latents, draws.noise.to(device), sigmas)
    dtype = next(transformer.parameters()).dtype
    typed = Conditioning(
        cond.latent_mean,
        cond.latent_std,
        cond.prompt_embeds.to(device, dtype),
        None if cond.pooled is None else cond.pooled.to(device, dtype),
        cond.time_ids,
        None if cond.text_mask is None else cond.text_mask.to(device),
    )
    prediction = flow_model(family).predict(transformer, noisy.to(dtype), timesteps, typed, guidance)
    return prediction, target


def flow_loss(
    transformer,
    noise_scheduler,
    cond: Conditioning,
    draws: Draws,
    latent_scale: LatentScale | tuple[float, float],
    family: Family,
    guidance: float = 3.5,
) -> torch.Tensor:
    """MSE between the transformer's velocity prediction and noise - x0 (:func:`flow_prediction_and_target`)."""
    prediction, target = flow_prediction_and_target(
        transformer, noise_scheduler, cond, draws, latent_scale, family, guidance
    )
    return F.mse_loss(prediction.float(), target.float(), reduction="mean")
