"""The MoE-LoRA baseline (paper Table 4): the trained skill experts, frozen, mixed by a learned gate.

``train_moe(run, paths, experts)`` attaches the experts to the frozen denoiser as gated layers
(selma_toolkit.adapters.moe: y = W0 x + sum_t g_t scale_t B_t A_t x), trains only the gate, as
the paper does ("only the gate trained: lr 1e-5, 5K steps"; [moe] in the recipe), with the
ordinary denoising loss on the mixture of every skill's self-generated data (the joint
baseline's samples, in the same seeded order), and writes ``<run>/moe/moe.safetensors``: the
experts as they are, the gate, and the experts' sha256. Training the experts jointly with the
gate would make it another mixture LoRA (the joint baseline); the paper keeps them frozen, so
does this. Resumable: ``<run>/moe/train/checkpoints/step-N`` (train/steps.py).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from selma_toolkit.adapters.moe import MoELora, attach_moe, check_experts, moe_record, save_moe, zero_gate
from selma_toolkit.config.recipes import RunRecipe
from selma_toolkit.io import sha256_file
from selma_toolkit.lora import load_lora, metadata_value
from selma_toolkit.models import detect_family
from selma_toolkit.paths import JOINT, RunPaths
from selma_toolkit.recipe import recipe_hash
from selma_toolkit.train import cache as caches
from selma_toolkit.train import model as parts
from selma_toolkit.train.checkpoint import training_fingerprint
from selma_toolkit.train.data import (
    dataset_fingerprint,
    image_digests,
    training_samples,
)
from selma_toolkit.train.loop import build_caches, denoising_loss, make_accelerator
from selma_toolkit.train.steps import Progress, finished, run_steps, variant_settings, with_train

log = logging.getLogger(__name__)

MOE = "moe"
OUTPUT_NAME = "moe.safetensors"


def moe_dir(paths: RunPaths) -> Path:
    """``<run>/moe/``: the gate's training state (``train/``) and the MoE-LoRA file."""
    return paths.root / MOE


def moe_file(paths: RunPaths) -> Path:
    return moe_dir(paths) / OUTPUT_NAME


def moe_train_dir(paths: RunPaths) -> Path:
    return moe_dir(paths) / "train"


def moe_is_current(run: RunRecipe, paths: RunPaths, experts: list[tuple[str, Path]]) -> tuple[bool, str]:
    """(done, detail): the MoE file exists, holds exactly these experts (sha256), the recipe's gate
    and moe.steps of training."""
    path = moe_file(paths)
    if not path.is_file():
        return False, "not trained yet"
    record = moe_record(path) or {}
    wanted = [sha256_file(p) for _, p in experts if p.is_file()]
    same = (
        [e.get("sha256") for e in record.get("experts", [])] == wanted
        and record.get("gate") == run.moe.gate
        and record.get("steps") == run.moe.steps
    )
    return same, f"{len(record.get('experts', []))} experts, {record.get('gate')} gate, step {record.get('steps')}" + (
        "" if same else ", out of date"
    )


def train_moe(
    run: RunRecipe, paths: RunPaths, experts: list[tuple[str, Path]], *, progress: Progress | None = None
) -> Path:
    """Train the gate of a MoE-LoRA over ``experts`` ((name, file), in order) on the mixture of the
    run's skills; return the MoE-LoRA file (see the module docstring)."""
    settings = variant_settings(
        run.train,
        learning_rate=run.moe.learning_rate,
        steps=run.moe.steps,
        batch_size=run.moe.batch_size,
        checkpoint_every=run.moe.checkpoint_every,
    )
    trained_run = with_train(run, settings)
    names = [name for name, _ in experts]
    loras = [load_lora(path) for _, path in experts]
    check_experts(loras, names)
    digests_of_experts = [sha256_file(path) for _, path in experts]
    info = [
        {
            "name": name,
            "skill": metadata_value(lora, "skill") or name,
            "sha256": digest,
            "file": path.name,
            "metadata": dict(lora.metadata),
        }
        for (name, path), lora, digest in zip(experts, loras, digests_of_experts)
    ]
    samples = training_samples(run, JOINT, paths)
    model_dir = parts.local_model_dir(run.base_model, run.revision)
    family = detect_family(str(model_dir))
    resolution = settings.resolution or run.images.resolution
    train_dir, output = moe_train_dir(paths), moe_file(paths)
    digests = image_digests(samples)
    fingerprint = {
        **training_fingerprint(trained_run, MOE, family.name, resolution, dataset_fingerprint(samples, digests)),
        "moe.gate": run.moe.gate,
        "moe.experts": digests_of_experts,
    }
    accelerator = make_accelerator(settings, train_dir)
    if finished(train_dir, fingerprint, settings.steps, OUTPUT_NAME, output):
        return output
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    latent_cache, text_cache = build_caches(
        trained_run, samples, digests, model_dir, family, train_dir, accelerator, weight_dtype, progress
    )
    text_width = int(text_cache.rows([0])["prompt_embeds"].shape[-1])
    denoiser = parts.load_denoiser(model_dir, family, weight_dtype)
    moe = MoELora(loras, run.moe.gate, zero_gate(loras, run.moe.gate, text_width), info)
    attached = attach_moe(denoiser, moe, trainable=True)
    denoiser.train()
    if settings.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    source = caches.ConditionSource(samples, resolution, device, latents=latent_cache, texts=text_cache, family=family)
    loss = denoising_loss(
        trained_run, settings, source, model_dir, family
    )  # an expert's loss, through the gated layers

    def micro_loss(models, step: int, slots: list[int]) -> torch.Tensor:
        return loss(models[family.denoiser], step, slots)

    def write_output(path: Path, steps: int) -> None:
        record = {
            "steps": steps,
            "base_model": run.base_model,
            "architecture": family.name,
            "recipe_sha256": recipe_hash(run),
            "trained_on": [s.name for s in run.skills],
            "learning_rate": settings.learning_rate,
        }
        save_moe(MoELora(loras, run.moe.gate, attached.gate_tensors(), info, record), path)

    log.info("MoE-LoRA: %d experts (%s), %s gate, %d steps", len(loras), ", ".join(names), run.moe.gate, settings.steps)
    from accelerate.utils import set_seed

    set_seed(settings.seed)  # the global generator (dropout) starts where it always does
    return run_steps(
        accelerator=accelerator,
        settings=settings,
        models={family.denoiser: denoiser},
        train_dir=train_dir,
        fingerprint=json.loads(json.dumps(fingerprint)),
        output_name=OUTPUT_NAME,
        micro_loss=micro_loss,
        write_output=write_output,
        output=output,
        progress=progress,
    )
