"""Pretrain the toy base model on ground-truth renders of the shapes world, from a seed.

Two stages, top to bottom in :func:`pretrain`:

1. **VAE** (``vae_steps``): the AutoencoderKL learns to reconstruct renders (MSE plus a small KL
   term, as SD's autoencoder minus its perceptual and GAN losses); then its latent scaling factor
   is set to 1 / std of the latents, as SD's 0.18215 was chosen.
2. **UNet and text encoder** (``steps``), jointly, with the VAE frozen: the epsilon-prediction
   loss of the pipeline's noise schedule, AdamW with a linear warm-up then a constant learning
   rate, gradient clipping, ``caption_dropout`` of captions replaced by "" (so classifier-free
   guidance works), and an exponential moving average (diffusers ``EMAModel``) of both, which is
   what gets exported. A constant rate makes a shorter run an exact prefix of a longer one, so any
   step's EMA snapshot is what ``--steps`` of that length would give.

Data: step ``i`` draws its captions from the shipped toy skill grammars (and single objects) and
its renders, noise and timesteps from generators seeded by (seed, stage, i): the run is a pure
function of the settings, resumes exactly from its last checkpoint, and reproduces from the seed
on the same machine. Floating-point sums depend on the CPU thread count (and on the CPU), so
another ``--threads`` value or machine gives slightly different weights.

Folder ``out``::

    checkpoint/           the latest training state (safetensors + state.json), replaced atomically
    snapshots/step-N.safetensors   EMA UNet + text encoder at each checkpoint (fp16)
    vae/                  the trained VAE (diffusers layout), written when stage 1 ends
    log.jsonl             loss per step; evals.jsonl: held-out faithfulness of snapshots
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from selma_toolkit.config.pretrain import RESUMABLE, SKILLS, STATE_FILE, PretrainSettings
from selma_toolkit.config.prompts import GrammarSettings
from selma_toolkit.errors import Option, Remedy, TrainingError
from selma_toolkit.io import JsonlAppender, atomic_write_text
from selma_toolkit.models import resolve_model
from selma_toolkit.prompts.grammar import GrammarSource
from selma_toolkit.recipe import load_skill_recipe
from selma_toolkit.toyworld.model import NOISE_SCHEDULE, build_text_encoder, build_unet, build_vae, toy_tokenizer
from selma_toolkit.toyworld.renderer import draw_objects, place_objects
from selma_toolkit.toyworld.snapshots import evaluate_snapshot
from selma_toolkit.toyworld.web_captions import web_caption
from selma_toolkit.toyworld.world import COLORS, SHAPES, parse_caption

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int, float], None]  # (stage, step, total, loss)


# ------------------------------------------------------------------------------------------ data


def caption_sources() -> list[Any]:
    """The grammars captions are drawn from: the three toy skills and single objects."""
    grammars = [load_skill_recipe(name).grammar for name in SKILLS]
    grammars.append(
        GrammarSettings(
            templates=["a {color} {shape}", "a {shape}"], words={"color": list(COLORS), "shape": list(SHAPES)}
        )
    )
    return grammars


def batch_captions(grammars: list[Any], seed: int, stage: str, step: int, size: int) -> tuple[list[str], random.Random]:
    """The captions of one step (each from a grammar chosen uniformly) and the generator that
    continues to place their objects: a pure function of (seed, stage, step)."""
    rng = random.Random(f"toyworld-pretrain:{seed}:{stage}:{step}")
    captions = []
    for _ in range(size):
        grammar = rng.choice(grammars)
        captions.append(GrammarSource(grammar, seed).fill(rng.choice(grammar.templates), rng))
    return captions, rng


def render_batch(captions: list[str], rng: random.Random):
    """Renders of ``captions`` as a float tensor [n, 3, 32, 32] in [-1, 1]."""
    return draw_batch(captions, rng)[0]


def draw_batch(captions: list[str], rng: random.Random):
    """Renders of ``captions`` ([n, 3, 32, 32] in [-1, 1]) and, per render, (objects, relation)."""
    import numpy as np
    import torch

    arrays, drawn = [], []
    for caption in captions:  # as render_caption does, keeping the placed objects
        scene = parse_caption(caption)
        objects = place_objects(scene, rng)
        arrays.append(np.asarray(draw_objects(objects), dtype=np.float32))
        drawn.append((objects, scene.relation))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0, drawn


def training_texts(captions: list[str], drawn: list, settings: PretrainSettings, step: int) -> list[str]:
    """What the text encoder reads for each render: the explicit caption, or a web-like caption of
    the drawn objects from a generator seeded by (seed, step) (the renders stay those of "explicit")."""
    if settings.captions == "explicit":
        return captions

    rng = random.Random(f"toyworld-pretrain:{settings.seed}:web:{step}")
    return [web_caption(objects, relation, rng).text for objects, relation in drawn]


def step_generator(seed: int, stage: str, step: int):
    """The torch generator of one step's noise, timesteps and caption dropout."""
    import hashlib

    import torch

    digest = hashlib.blake2b(f"toyworld-pretrain:{seed}:{stage}:{step}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


# ------------------------------------------------------------------------------------ checkpoints


def flatten_optimizer(optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """AdamW state as safetensors tensors plus JSON (its param groups), so no pickle is written."""
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{key}": value.contiguous() for index, entry in state["state"].items() for key, value in entry.items()
    }
    return tensors, {"param_groups": state["param_groups"]}


def restore_optimizer(optimizer, tensors: dict[str, Any], extra: dict[str, Any]) -> None:
    entries: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        index, key = name.split(".", 1)
        entries.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": entries, "param_groups": extra["param_groups"]})


def save_checkpoint(out: Path, record: dict[str, Any], files: dict[str, dict[str, Any]]) -> None:
    """Write ``checkpoint/`` as a whole: into a partial folder, then renamed over the old one."""
    from safetensors.torch import save_file

    partial, final, old = out / ".checkpoint.partial", out / "checkpoint", out / ".checkpoint.old"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        for name, tensors in files.items():
            save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(partial / f"{name}.safetensors"))
        atomic_write_text(partial / STATE_FILE, json.dumps(record, indent=1) + "\n")
    except OSError as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise TrainingError(
            f"{out}: could not write a checkpoint ({exc}); free disk space and rerun to resume"
        ) from None
    if final.exists():
        final.rename(old)
    partial.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def _load_state(out: Path, settings: PretrainSettings) -> dict[str, Any] | None:
    if not (out / "checkpoint").exists() and (out / ".checkpoint.old" / STATE_FILE).is_file():
        # Killed between the two renames of save_checkpoint: the previous checkpoint is complete.
        (out / ".checkpoint.old").rename(out / "checkpoint")
    path = out / "checkpoint" / STATE_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    saved = record["settings"]
    defaults = PretrainSettings().model_dump()  # a checkpoint written before a setting existed has its default
    changed = {
        k: (saved.get(k, defaults[k]), v)
        for k, v in settings.model_dump().items()
        if k not in RESUMABLE and saved.get(k, defaults[k]) != v
    }
    if changed:
        shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise TrainingError(
            what=f"holds a pretraining run with other settings ({shown})",
            where=str(out),
            remedies=[Remedy.do("resume with the same settings"), Remedy.change("out", "folder")],
        )
    if record["step"] > settings.steps and record["stage"] == "unet":
        raise TrainingError(
            what=f"already trained {record['step']} steps, more than asked",
            where=(str(out), Option("steps")),
            found=settings.steps,
            remedies=[Remedy.do(f"export a snapshot from {out / 'snapshots'} instead")],
        )
    return record


# ------------------------------------------------------------------------------------------ stages


def _train_vae(out: Path, settings: PretrainSettings, grammars, record, progress: Progress | None):
    import torch

    torch.manual_seed(settings.seed)
    vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=settings.vae_learning_rate, weight_decay=0.0)
    start = 0
    if record is not None and record["stage"] == "vae":
        from safetensors.torch import load_file

        vae.load_state_dict(load_file(str(out / "checkpoint" / "vae.safetensors")))
        restore_optimizer(optimizer, load_file(str(out / "checkpoint" / "optimizer.safetensors")), record["optimizer"])
        start = record["step"]
        log.info("VAE: resuming at step %d", start)
    with JsonlAppender(out / "log.jsonl") as logger:
        for step in range(start, settings.vae_steps):
            captions, rng = batch_captions(grammars, settings.seed, "vae", step, settings.vae_batch_size)
            pixels = render_batch(captions, rng)
            posterior = vae.encode(pixels).latent_dist
            reconstruction = vae.decode(posterior.sample(generator=step_generator(settings.seed, "vae", step))).sample
            mse = torch.nn.functional.mse_loss(reconstruction, pixels)
            loss = mse + settings.kl_weight * posterior.kl().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            logger.append({"stage": "vae", "step": step + 1, "loss": round(mse.item(), 6)})
            if progress:
                progress("vae", step + 1, settings.vae_steps, mse.item())
            if (step + 1) % settings.checkpoint_every == 0 and step + 1 < settings.vae_steps:
                tensors, extra = flatten_optimizer(optimizer)
                save_checkpoint(
                    out,
                    {"stage": "vae", "step": step + 1, "settings": settings.model_dump(), "optimizer": extra},
                    {"vae": vae.state_dict(), "optimizer": tensors},
                )
    # Latent scale: 1 / std of the latent means over fresh renders (SD chose 0.18215 the same way).
    with torch.no_grad():
        captions, rng = batch_captions(grammars, settings.seed, "scale", 0, 512)
        means = vae.encode(render_batch(captions, rng)).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    partial = out / ".vae.partial"
    shutil.rmtree(partial, ignore_errors=True)
    vae.save_pretrained(partial, safe_serialization=True)
    partial.rename(out / "vae")  # whole or absent: a kill while saving retrains the (short) VAE stage
    log.info("VAE: trained %d steps; scaling_factor %.4f", settings.vae_steps, vae.config.scaling_factor)
    return vae


def _copy_vae(spec: str, out: Path) -> None:
    """The VAE of a pipeline folder or toy base, saved (float32) as ``out/vae``: stage 1 skipped."""
    import torch
    from diffusers import AutoencoderKL

    source = Path(resolve_model(spec)) / "vae"
    if not (source / "config.json").is_file():
        raise TrainingError(f"vae_from = {spec!r}: {source} holds no diffusers VAE (config.json)")
    vae = AutoencoderKL.from_pretrained(source, dtype=torch.float32)
    partial = out / ".vae.partial"
    shutil.rmtree(partial, ignore_errors=True)
    vae.save_pretrained(partial, safe_serialization=True)
    partial.rename(out / "vae")
    log.info("VAE: copied from %s (stage 1 skipped)", spec)


def _threads_history(record: dict[str, Any] | None, start: int, threads: int) -> list[list[int]]:
    """[[first step, torch threads], ...] of a run: floating-point sums depend on the thread count,
    so an exact rebuild repeats each part with its own count (snapshots.provenance writes the commands)."""
    history = [list(part) for part in (record or {}).get("threads_history", [])]
    if not history and record and record.get("threads"):
        history = [[0, int(record["threads"])]]  # a checkpoint from before the history was kept
    if not history or history[-1][1] != threads:
        history.append([start, threads])
    return history


def _snapshot_parts(unet, text_encoder, ema) -> dict[str, Any]:
    """EMA weights of the UNet and the text encoder, named ``unet.<param>`` / ``text_encoder.<param>``."""
    names = [f"unet.{n}" for n, _ in unet.named_parameters()] + [
        f"text_encoder.{n}" for n, _ in text_encoder.named_parameters()
    ]
    return {name: shadow.detach().clone() for name, shadow in zip(names, ema.shadow_params)}


def pretrain(
    out: str | Path,
    settings: PretrainSettings,
    *,
    progress: Progress | None = None,
    evaluate: Callable[[Path, int], dict[str, float]] | None = None,
) -> Path:
    """Run (or resume) pretraining into ``out``; return the latest EMA snapshot's path.

    ``evaluate(snapshot, step)`` (default: ``snapshots.evaluate_snapshot``) scores a snapshot on held-out
    prompts every ``eval_every`` steps; the scores go to ``evals.jsonl``.
    """
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler
    from diffusers.training_utils import EMAModel
    from safetensors.torch import load_file, save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = _load_state(out, settings)
    grammars = caption_sources()
    if settings.vae_from and not (out / "vae" / "config.json").is_file():
        _copy_vae(settings.vae_from, out)
    if (out / "vae" / "config.json").is_file():
        vae = AutoencoderKL.from_pretrained(out / "vae")
    else:
        vae = _train_vae(out, settings, grammars, record, progress)
    if record is not None and record["stage"] == "vae":
        record = None  # the VAE is finished: stage 2 starts from its first step
    vae.requires_grad_(False).eval()
    scale = vae.config.scaling_factor

    torch.manual_seed(settings.seed + 1)
    tokenizer = toy_tokenizer(settings.captions)
    unet, text_encoder = build_unet(), build_text_encoder(len(tokenizer))
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (settings.warmup_steps + 1)))
    ema = EMAModel(params, decay=settings.ema_max_decay, use_ema_warmup=True)
    noise_scheduler = DDPMScheduler(**NOISE_SCHEDULE)
    start = 0
    if record is not None:
        folder = out / "checkpoint"
        unet.load_state_dict(load_file(str(folder / "unet.safetensors")))
        text_encoder.load_state_dict(load_file(str(folder / "text_encoder.safetensors")))
        restore_optimizer(optimizer, load_file(str(folder / "optimizer.safetensors")), record["optimizer"])
        ema_tensors = load_file(str(folder / "ema.safetensors"))
        ema.load_state_dict({**record["ema"], "shadow_params": [ema_tensors[str(i)] for i in range(len(ema_tensors))]})
        schedule.load_state_dict(record["schedule"])
        start = record["step"]
        log.info("UNet: resuming at step %d", start)
    threads = _threads_history(record, start, torch.get_num_threads())
    snapshots = out / "snapshots"
    snapshots.mkdir(exist_ok=True)
    if evaluate is None:

        def evaluate(snapshot: Path, step: int) -> dict[str, float]:
            return evaluate_snapshot(snapshot, out / "vae", settings)

    unet.train()
    text_encoder.train()
    with JsonlAppender(out / "log.jsonl") as logger:
        for step in range(start, settings.steps):
            began = time.perf_counter()
            captions, rng = batch_captions(grammars, settings.seed, "unet", step, settings.batch_size)
            pixels, drawn = draw_batch(captions, rng)
            generator = step_generator(settings.seed, "unet", step)
            dropped = torch.rand(len(captions), generator=generator) < settings.caption_dropout
            texts = [
                "" if drop else text
                for text, drop in zip(training_texts(captions, drawn, settings, step), dropped.tolist())
            ]
            with torch.no_grad():
                latents = vae.encode(pixels).latent_dist.sample(generator=generator) * scale
            noise = torch.randn(latents.shape, generator=generator)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(texts),), generator=generator)
            ids = tokenizer(
                texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids
            prediction = unet(
                noise_scheduler.add_noise(latents, noise, timesteps),
                timesteps,
                encoder_hidden_states=text_encoder(ids)[0],
            ).sample
            loss = torch.nn.functional.mse_loss(prediction, noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            ema.step(params)
            done = step + 1
            logger.append(
                {
                    "stage": "unet",
                    "step": done,
                    "loss": round(loss.item(), 6),
                    "lr": schedule.get_last_lr()[0],
                    "seconds": round(time.perf_counter() - began, 3),
                }
            )
            if progress:
                progress("unet", done, settings.steps, loss.item())
            if done % settings.checkpoint_every == 0 or done == settings.steps:
                snapshot = snapshots / f"step-{done}.safetensors"
                save_file({k: v.half() for k, v in _snapshot_parts(unet, text_encoder, ema).items()}, str(snapshot))
                tensors, extra = flatten_optimizer(optimizer)
                ema_state = ema.state_dict()
                shadow = {str(i): p for i, p in enumerate(ema_state.pop("shadow_params"))}
                save_checkpoint(
                    out,
                    {
                        "stage": "unet",
                        "step": done,
                        "settings": settings.model_dump(),
                        "optimizer": extra,
                        "ema": ema_state,
                        "schedule": schedule.state_dict(),
                        "threads": torch.get_num_threads(),
                        "threads_history": threads,
                    },
                    {
                        "unet": unet.state_dict(),
                        "text_encoder": text_encoder.state_dict(),
                        "optimizer": tensors,
                        "ema": shadow,
                    },
                )
                if settings.eval_every and done % settings.eval_every == 0:
                    scores = evaluate(snapshot, done)
                    with JsonlAppender(out / "evals.jsonl") as evals:
                        evals.append({"step": done, **scores})
                    log.info("step %d: held-out faithfulness %s", done, scores)
    return snapshots / f"step-{settings.steps}.safetensors"
