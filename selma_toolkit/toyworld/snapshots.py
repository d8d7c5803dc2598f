"""EMA snapshots of a pretraining run: load one as a pipeline, score it on held-out prompts,
export it as the diffusers folder that ships as ``toy:shapes`` (with its provenance)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from selma_toolkit.config.pretrain import SKILLS, STATE_FILE, PretrainSettings
from selma_toolkit.dataset import read_prompts
from selma_toolkit.errors import Remedy, TrainingError
from selma_toolkit.io import atomic_write_text
from selma_toolkit.prompts import generate_prompts
from selma_toolkit.recipe import load_skill_recipe
from selma_toolkit.toyworld.model import build_pipeline, build_text_encoder, build_unet, toy_tokenizer
from selma_toolkit.toyworld.scorer import score_image


def load_snapshot(snapshot: Path, vae_dir: Path, captions: str = "explicit"):
    """A StableDiffusionPipeline (float32) from an EMA snapshot and the trained VAE; ``captions``
    is the run's setting (it chooses the tokenizer)."""
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    tokenizer = toy_tokenizer(captions)
    unet, text_encoder = build_unet(), build_text_encoder(len(tokenizer))
    weights = load_file(str(snapshot))
    for prefix, model in (("unet.", unet), ("text_encoder.", text_encoder)):
        part = {k[len(prefix) :]: v.float() for k, v in weights.items() if k.startswith(prefix)}
        missing, unexpected = model.load_state_dict(part, strict=False)
        # Only buffers (position ids) may be absent: a snapshot holds parameters.
        if unexpected or any(name in dict(model.named_parameters()) for name in missing):
            raise TrainingError(
                f"{snapshot}: does not fit the toy model (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
    vae = AutoencoderKL.from_pretrained(vae_dir, dtype=torch.float32)
    return build_pipeline(unet.eval(), vae.eval(), text_encoder.eval(), tokenizer)


def eval_prompts(out: Path, per_skill: int) -> dict[str, list[str]]:
    """``per_skill`` held-out prompts of each toy skill (the shipped recipes' prompt streams)."""
    prompts = {}
    for name in SKILLS:
        path = out / "prompts" / f"{name}.jsonl"
        generate_prompts(load_skill_recipe(name), path, heldout=per_skill)
        prompts[name] = [record.prompt for record in read_prompts(path, split="heldout")][:per_skill]
    return prompts


def sample_images(pipe, prompts: list[str], seeds: list[int], *, steps: int, guidance: float, batch_size: int = 64):
    """PIL images of ``prompts`` (one per prompt, each from a CPU generator with its seed)."""
    import torch

    images = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds[chunk]]
        images += pipe(
            prompt=prompts[chunk],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
            output_type="pil",
        ).images
    return images


def evaluate_snapshot(snapshot: Path, vae_dir: Path, settings: PretrainSettings) -> dict[str, float]:
    """Mean toyworld score (0-100) per skill of a snapshot on held-out prompts."""
    pipe = load_snapshot(snapshot, vae_dir, settings.captions)
    scores = {}
    for skill, prompts in eval_prompts(snapshot.parent.parent, settings.eval_prompts).items():
        images = sample_images(
            pipe,
            prompts,
            list(range(len(prompts))),
            steps=settings.eval_sampling_steps,
            guidance=settings.eval_guidance,
        )
        values = [score_image(image, prompt) for image, prompt in zip(images, prompts)]
        scores[skill] = round(sum(values) / len(values), 2)
    return scores


def export_base(out: str | Path, snapshot: str | Path, target: str | Path) -> Path:
    """Write the pipeline of ``snapshot`` (EMA weights) with the run's VAE to ``target`` as a
    diffusers folder in fp16 safetensors (the shipped ``toy:shapes``), replacing it whole."""
    import torch

    out, snapshot, target = Path(out), Path(snapshot), Path(target)
    if not snapshot.is_file():
        raise TrainingError(f"{snapshot}: no such snapshot; snapshots are in {out / 'snapshots'}")
    captions = json.loads((out / "checkpoint" / STATE_FILE).read_text())["settings"].get("captions", "explicit")
    pipe = load_snapshot(snapshot, out / "vae", captions).to(torch.float16)
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    pipe.save_pretrained(partial, safe_serialization=True)
    for path in partial.rglob("*"):
        if path.is_file():
            path.chmod(0o644)  # package data: readable by every user of an installation
    atomic_write_text(partial / "toyworld.json", json.dumps(provenance(out, snapshot), indent=1) + "\n")
    if target.exists():
        shutil.rmtree(target)
    partial.rename(target)
    return target


def provenance(out: Path, snapshot: Path) -> dict[str, Any]:
    """How a snapshot was made: the settings of a run that ends at its step (a shorter run is a
    prefix of a longer one), the thread count, and the commands that rebuild it."""
    record = json.loads((out / "checkpoint" / STATE_FILE).read_text())
    step = int(snapshot.stem.split("-")[1])
    settings = {**record["settings"], "steps": step}
    threads = record.get("threads")
    defaults = PretrainSettings().model_dump()
    options = " ".join(
        f"--{key.replace('_', '-')} {value}"
        for key, value in settings.items()
        if key
        in (
            "seed",
            "steps",
            "vae_steps",
            "batch_size",
            "learning_rate",
            "checkpoint_every",
            "eval_every",
            "captions",
            "vae_from",
        )
        and (value != defaults[key] or key in ("seed", "steps"))
    )
    # One command per part of the run that used its own torch thread count (an exact rebuild needs them all).
    history = [part for part in record.get("threads_history") or ([[0, threads]] if threads else []) if part[0] < step]
    ends = [start for start, _ in history[1:]] + [step]
    commands = [
        re.sub(r"--steps \d+", f"--steps {end}", f"selma toyworld pretrain --out OUT {options}") + f" --threads {count}"
        for (_, count), end in zip(history, ends)
    ] or [f"selma toyworld pretrain --out OUT {options}"]
    return {
        "snapshot": snapshot.name,
        "step": step,
        "settings": settings,
        "threads": threads,
        "threads_history": history,
        "rebuild": [*commands, f"selma toyworld export OUT --step {step} --to FOLDER"],
    }


def snapshot_path(out: str | Path, step: int | None = None) -> Path:
    """The EMA snapshot of ``step`` (default: the latest) in a pretraining folder."""
    folder = Path(out) / "snapshots"
    found = (
        sorted(folder.glob("step-*.safetensors"), key=lambda p: int(p.stem.split("-")[1])) if folder.is_dir() else []
    )
    if not found:
        raise TrainingError(
            what="no snapshots", where=str(folder), remedies=[Remedy.run(f"selma toyworld pretrain --out {out}")]
        )
    if step is None:
        return found[-1]
    path = folder / f"step-{step}.safetensors"
    if not path.is_file():
        raise TrainingError(f"{path}: no snapshot of step {step}; there are {', '.join(p.stem for p in found)}")
    return path
