"""Stage 3: train one LoRA skill expert (or the mixture baseline), top to bottom.

``train_expert(run, skill, paths)`` reads the skill's image dataset, builds the latent and text
caches, adds peft LoRA layers to the frozen UNet or SD 3 / Flux transformer (and text encoders,
if asked), trains with
accelerate (gradient accumulation up to the effective batch, mixed precision on GPU, several GPUs
under ``accelerate launch``), writes a checkpoint every ``checkpoint_every`` steps and the expert
to ``paths.expert(skill)``. Run again, it resumes from the latest checkpoint; a finished run only
rewrites the expert file.
"""

from __future__ import annotations

import functools
import logging
from collections import Counter
from pathlib import Path

import torch

from selma_toolkit.architectures import Family
from selma_toolkit.config.recipes import RunRecipe
from selma_toolkit.config.train import TrainSettings
from selma_toolkit.errors import RecipeError
from selma_toolkit.lora import load_lora, lora_metadata, save_lora
from selma_toolkit.models import detect_family
from selma_toolkit.paths import JOINT, RunPaths
from selma_toolkit.recipe import recipe_hash
from selma_toolkit.train import cache as caches
from selma_toolkit.train import model as parts
from selma_toolkit.train.checkpoint import check_resumable, checkpoints, training_fingerprint
from selma_toolkit.train.data import (
    dataset_fingerprint,
    image_digests,
    sample_generator,
    sample_index,
    training_samples,
)
from selma_toolkit.train.steps import Progress, TrainEvent, micro_batching, run_steps

log = logging.getLogger(__name__)


def expert_metadata(run: RunRecipe, skill: str, family: Family, steps: int) -> dict[str, str]:
    """The ``__metadata__`` of an expert file; ``save_lora`` adds rank, alpha, targets, toolkit
    version and the kohya / ModelSpec fields from the tensors."""
    return lora_metadata(
        base_model=run.base_model,
        architecture=family.name,
        skill=skill,
        skills=[s.name for s in run.skills] if skill == JOINT else None,
        recipe_sha256=recipe_hash(run),
        **{"selma.steps": steps},
    )


def make_accelerator(settings: TrainSettings, train_dir: Path):
    from accelerate import Accelerator

    precision = settings.mixed_precision
    if precision == "auto":
        precision = "fp16" if torch.cuda.is_available() else "no"
    if precision == "fp16" and not torch.cuda.is_available():
        raise RecipeError("train.mixed_precision = 'fp16' needs a CUDA GPU; use 'no' (or 'bf16') on a CPU")
    if settings.trackers:
        from accelerate.utils import is_tensorboard_available, is_wandb_available

        available = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
        missing = [t for t in settings.trackers if not available[t]]
        if missing:
            raise RecipeError(
                f"train.trackers = {settings.trackers}: {missing} not installed; pip install {' '.join(missing)}"
            )
    # The lr scheduler is stepped by hand once per optimizer step (accelerate would otherwise step
    # it once per process), and accumulation is done by hand (see the loop): a resumed run with a
    # different micro-batch size must not inherit accelerate's micro-step counter.
    # cpu=True without CUDA: processes started by torchrun / accelerate launch then join one gloo
    # group instead of each training alone.
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=precision,
        log_with=settings.trackers or None,
        project_dir=str(train_dir),
        step_scheduler_with_optimizer=False,
    )


def _show_cache_progress(progress, done: int, total: int) -> None:
    progress(TrainEvent("cache", done, total))


def build_caches(
    run: RunRecipe,
    samples,
    digests: list[str],
    model_dir: Path,
    family: Family,
    train_dir: Path,
    accelerator,
    weight_dtype: torch.dtype,
    progress: Progress | None,
):
    """(latent cache, text cache), built where missing by the main process first; each None when
    off (the text cache is off while the text encoders train: their outputs change every step)."""
    if not run.train.cache:
        return None, None
    resolution = run.train.resolution or run.images.resolution
    device, root = accelerator.device, train_dir / "cache"
    shown = None
    if progress is not None and accelerator.is_main_process:
        shown = functools.partial(_show_cache_progress, progress)

    def make_latent_encoder():
        return caches.latent_encoder(samples, parts.load_vae(model_dir, family).to(device), resolution, family)

    with accelerator.main_process_first():
        spec = caches.latent_cache_spec(model_dir, resolution, digests)
        latents = caches.CachedTensors(caches.ensure_cache(spec, root, len(samples), make_latent_encoder, shown))
    if run.train.train_text_encoder:
        return latents, None
    names = parts.text_encoder_names(family)

    def make_caption_encoder():
        tokenizers, encoders = parts.load_text_encoders(model_dir, family, weight_dtype)
        return caches.caption_encoder(samples, tokenizers, [e.to(device) for e in encoders], device, family=family)

    with accelerator.main_process_first():
        spec = caches.text_cache_spec(model_dir, names, weight_dtype, samples)
        texts = caches.CachedTensors(caches.ensure_cache(spec, root, len(samples), make_caption_encoder, shown))
    return latents, texts


def build_models(
    settings: TrainSettings, model_dir: Path, family: Family, device, weight_dtype: torch.dtype, *, cache_text: bool
):
    """({component: model with trainable LoRA}, tokenizers, text encoders): the frozen base in
    ``weight_dtype``, LoRA parameters in float32; text encoders only when their outputs are not
    cached. The denoiser is the family's (UNet, or the SD 3 / Flux transformer), its targets the
    recipe's ``train.target_modules`` or, unset, the family's default."""
    denoiser = parts.load_denoiser(model_dir, family, weight_dtype)
    parts.add_lora(denoiser, family.denoiser, settings, settings.denoiser_targets(family.lora_targets))
    trained = {family.denoiser: denoiser}
    tokenizers, text_encoders = [], []
    if not cache_text:
        tokenizers, text_encoders = parts.load_text_encoders(model_dir, family, weight_dtype)
        text_encoders = [e.to(device) for e in text_encoders]
        if settings.train_text_encoder:
            for name, encoder in zip(parts.text_encoder_names(family), text_encoders):
                parts.add_lora(encoder, name, settings)
                trained[name] = encoder
    for model in trained.values():
        model.train()  # LoRA dropout and gradient checkpointing act in training mode only
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        if settings.gradient_checkpointing and hasattr(model, "enable_gradient_checkpointing"):
            model.enable_gradient_checkpointing()  # diffusers UNet / transformer
        elif settings.gradient_checkpointing:  # transformers text encoder (renamed in transformers 5)
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
    return trained, tokenizers, text_encoders


def denoising_loss(
    run: RunRecipe, settings: TrainSettings, source: caches.ConditionSource, model_dir: Path, family: Family
):
    """``loss(denoiser, step, slots)``: the family's denoising loss (epsilon / v, or flow) on the
    samples at stream positions ``step * batch_size + slot``, with each slot's own noise draws; what
    an expert, the mixture baseline and the MoE gate train on."""
    noise_scheduler = parts.load_noise_scheduler(model_dir, family)
    num_timesteps = noise_scheduler.config.num_train_timesteps
    latent_scale = parts.vae_latent_scale(model_dir, family)
    count = len(source.samples)

    def loss(denoiser, step: int, slots: list[int]) -> torch.Tensor:
        indices = [sample_index(step * settings.batch_size + s, count, settings.seed) for s in slots]
        cond = source(indices)
        generators = [sample_generator(settings.seed, step, s) for s in slots]
        draws = parts.draw(generators, tuple(cond.latent_mean.shape[1:]), num_timesteps)
        # Flux's guidance embedding gets the guidance the run's images were drawn with.
        return parts.diffusion_loss(
            denoiser, noise_scheduler, cond, draws, latent_scale, family, guidance=run.images.guidance_scale
        )

    return loss


def train_expert(run: RunRecipe, skill: str, paths: RunPaths, *, progress: Progress | None = None) -> Path:
    """Train the LoRA expert of ``skill`` (``JOINT``: one LoRA on all skills' data, the paper's
    mixture baseline), resuming from the latest checkpoint; return the expert file's path."""
    from accelerate.utils import set_seed

    settings = run.train
    train_dir = paths.train_dir(skill)
    samples = training_samples(run, skill, paths)
    model_dir = parts.local_model_dir(run.base_model, run.revision)
    family = detect_family(str(model_dir))
    if settings.train_text_encoder and family.conditioning != "unet":
        raise RecipeError(
            f"train.train_text_encoder = true: text-encoder LoRA is trained for SD 1.x / 2.x / XL only; "
            f"{family.title} experts adapt the transformer. Set train.train_text_encoder = false"
        )
    resolution = settings.resolution or run.images.resolution
    accelerator = make_accelerator(settings, train_dir)
    micro_batching(settings, accelerator.num_processes)  # a batch size that does not split fails before any work
    digests = image_digests(samples)
    fingerprint = training_fingerprint(run, skill, family.name, resolution, dataset_fingerprint(samples, digests))
    saved = checkpoints(train_dir)
    resume = saved[-1] if saved else None
    expert_name = f"{skill}.safetensors"
    if resume is not None:
        check_resumable(resume, fingerprint, settings.steps)
        if resume.step == settings.steps:
            log.info("%s: already trained %d steps; writing the expert from %s", skill, resume.step, resume.path)
            if accelerator.is_main_process:
                save_lora(load_lora(resume.path / expert_name), paths.expert(skill), format=settings.lora_format)
            return paths.expert(skill)

    set_seed(settings.seed)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    latent_cache, text_cache = build_caches(
        run, samples, digests, model_dir, family, train_dir, accelerator, weight_dtype, progress
    )
    trained, tokenizers, text_encoders = build_models(
        settings, model_dir, family, device, weight_dtype, cache_text=text_cache is not None
    )
    vae = parts.load_vae(model_dir, family).to(device) if latent_cache is None else None
    names = parts.text_encoder_names(family)
    source = caches.ConditionSource(
        samples,
        resolution,
        device,
        latents=latent_cache,
        texts=text_cache,
        vae=vae,
        tokenizers=tokenizers,
        text_encoders=text_encoders,
        family=family,
    )
    loss = denoising_loss(run, settings, source, model_dir, family)

    def micro_loss(models, step: int, slots: list[int]) -> torch.Tensor:
        # Trained text encoders run through their prepared (DDP) wrappers, so their gradients are all-reduced.
        source.text_encoders = [models.get(name, encoder) for name, encoder in zip(names, text_encoders)]
        return loss(models[family.denoiser], step, slots)

    def loss_record(step: int) -> dict:
        record = {"epoch": round((step + 1) * settings.batch_size / len(samples), 4)}
        if skill == JOINT:  # which skills the batch drew from
            positions = range(step * settings.batch_size, (step + 1) * settings.batch_size)
            record["sources"] = dict(
                Counter(samples[sample_index(p, len(samples), settings.seed)].source for p in positions)
            )
        return record

    def write_expert(path: Path, steps: int) -> None:
        unwrapped = {name: accelerator.unwrap_model(model) for name, model in trained.items()}
        lora = parts.lora_weights(unwrapped, expert_metadata(run, skill, family, steps))
        save_lora(lora, path, format=settings.lora_format)

    run_steps(
        accelerator=accelerator,
        settings=settings,
        models=trained,
        train_dir=train_dir,
        fingerprint=fingerprint,
        output_name=expert_name,
        micro_loss=micro_loss,
        write_output=write_expert,
        output=paths.expert(skill),
        progress=progress,
        loss_record=loss_record,
        tracker_run=f"selma-{run.name}-{skill}",
    )
    log.info("%s: expert written to %s", skill, paths.expert(skill))
    return paths.expert(skill)


def train_joint(run: RunRecipe, paths: RunPaths, *, progress: Progress | None = None) -> Path:
    """Train one LoRA on the mixture of every skill's dataset (``experts/joint.safetensors``)."""
    return train_expert(run, JOINT, paths, progress=progress)
