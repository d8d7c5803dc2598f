"""The DPO variant (paper Table 4): preference pairs from the base's own images, Diffusion-DPO on a LoRA.

Per skill (``train_dpo_expert(run, skill, paths)``):

1. **Pairs** (``preference_pairs``): for each train prompt, ``2 * dpo.pairs_per_prompt`` images
   drawn by the base with the evaluation image code (paired-noise seeds ``image_seed(s_k, prompt
   id)``, s_k = images.seed + DPO_SEED_STEP * (k + 1): other seeds than the skill's dataset);
   images 2j and 2j+1 form pair j. Each image is scored by ``dpo.scorer`` (default: the first of
   evaluate.scorers); the higher score wins, a tie (or an image the scorer cannot score) drops the
   pair. Scores are kept in ``scores.jsonl`` (resumable, keyed by the image's sha256), the pairing
   in ``pairs.jsonl``.
2. **Diffusion-DPO** (Wallace et al. 2023) on a fresh LoRA of the recipe's rank: for a pair
   (x_w, x_l) with one timestep t and one noise eps for both images,
   ``loss = -log sigmoid(-beta/2 * ((e_w - r_w) - (e_l - r_l)))`` with e = ||target - pred_theta||^2
   (mean over the latent's elements) for the model with the LoRA and r the same for the reference,
   the base without it (the LoRA layers disabled, peft's ``enable_adapters(False)``); target =
   eps (or v for v-prediction models), and for the flow-matching families (SD 3, Flux and the other
   DiT families) the velocity noise - x0 at the pair's shared sigma, as their denoising loss.
3. The DPO experts of all skills are merged with merge.method (the paper: "experts merged by
   averaging"): ``train_dpo(run, paths)``, the run's variant ``dpo``.

Layout: a run folder of its own under ``<run>/dpo/`` (selma_toolkit.paths): ``pair-images/<skill>/
<prompt id>-seed<s>.png``; ``skills/<skill>/`` ``scores.jsonl``, ``pairs.jsonl``, ``train/``;
``experts/<skill>.safetensors``; ``merged/<method>.safetensors``. Every part resumes after a stop.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from selma_toolkit.architectures import Family
from selma_toolkit.config.recipes import RunRecipe
from selma_toolkit.dataset import read_prompts
from selma_toolkit.errors import DatasetError
from selma_toolkit.evaluate.scorers import build_scorer
from selma_toolkit.images.best_of import judge_label, load_judge
from selma_toolkit.io import JsonlAppender, atomic_write_text, read_jsonl, sha256_file
from selma_toolkit.lora import save_lora
from selma_toolkit.lora.merge import merge_files, metadata_record
from selma_toolkit.models import detect_family
from selma_toolkit.paths import RunPaths
from selma_toolkit.train import cache as caches
from selma_toolkit.train import model as parts
from selma_toolkit.train.checkpoint import checkpoints, training_fingerprint
from selma_toolkit.train.data import (
    TrainSample,
    dataset_fingerprint,
    image_digests,
    sample_generator,
    sample_index,
)
from selma_toolkit.train.loop import build_caches, build_models, expert_metadata, make_accelerator
from selma_toolkit.train.steps import Progress, TrainEvent, finished, run_steps, variant_settings, with_train

log = logging.getLogger(__name__)

DPO = "dpo"
DPO_SEED_STEP = 7919  # pair-image seeds: images.seed + 7919 (k + 1), apart from the study's candidate seeds (+1000 k)
PAIR_VARIANT = "dpo-pairs"
PAIR_IMAGES = "pair-images"


def dpo_paths(paths: RunPaths) -> RunPaths:
    """The DPO variant's own run-folder layout, ``<run>/dpo/``."""
    return RunPaths(paths.root / DPO)


def pair_seeds(run: RunRecipe) -> list[int]:
    """The evaluation-style seeds of the pair images: 2 per pair (see the module docstring)."""
    return [run.images.seed + DPO_SEED_STEP * (k + 1) for k in range(2 * run.dpo.pairs_per_prompt)]


def scorer_name(run: RunRecipe) -> str:
    """The scorer that picks each pair's winner: dpo.scorer, else the first of evaluate.scorers."""
    return run.dpo.scorer or run.evaluate.scorers[0]


def scorer_label(run: RunRecipe) -> str:
    """scorer_name, with the judge and its model for ``"judge"`` (``judge:clipscore(toy:judge)``)."""

    name = scorer_name(run)
    return f"judge:{judge_label(run.images)}" if name == "judge" else name


# ---------------------------------------------------------------------------------------- pairs


@dataclass(frozen=True)
class Pair:
    """One preference pair of a prompt: the preferred image (``winner``) and the other."""

    prompt_id: int
    text: str
    winner: Path
    loser: Path
    winner_score: float
    loser_score: float


def pair_up(prompt_id: int, text: str, images: Sequence[Path], scores: Sequence[float | None]) -> list[Pair]:
    """Images 2j and 2j+1 form pair j; the higher score wins; equal scores, or an image without a
    score, drop the pair."""
    pairs = []
    for j in range(len(images) // 2):
        a, b = scores[2 * j], scores[2 * j + 1]
        if a is None or b is None or a == b:
            continue
        first, second = (2 * j, 2 * j + 1) if a > b else (2 * j + 1, 2 * j)
        pairs.append(Pair(prompt_id, text, images[first], images[second], float(scores[first]), float(scores[second])))
    return pairs


def _score_images(path: Path, scorer, items: list[tuple[Path, str]], batch_size: int) -> dict[Path, float | None]:
    """Every image's score, from ``scores.jsonl`` where it holds this scorer's score (with this
    model: the judge and the evaluation may both be clipscore, with other models) of these bytes."""
    from PIL import Image

    model = getattr(scorer, "cache_key", scorer.model_id)
    known: dict[tuple[str, str, str | None], float | None] = {}
    if path.is_file():
        for row in read_jsonl(path, repair_tail=True):
            known[(row["sha256"], row["scorer"], row.get("model"))] = row["score"]
    digests = {image: sha256_file(image) for image, _ in items}
    todo = [(image, text) for image, text in items if (digests[image], scorer.name, model) not in known]
    with JsonlAppender(path) as appender:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            opened = []
            for image, _ in batch:
                with Image.open(image) as handle:
                    opened.append(handle.convert("RGB"))
            for (image, _), value in zip(batch, scorer.score(opened, [text for _, text in batch])):
                value = None if value is None else float(value)
                known[(digests[image], scorer.name, model)] = value
                appender.append(
                    {
                        "image": image.name,
                        "sha256": digests[image],
                        "scorer": scorer.name,
                        "model": model,
                        "score": value,
                    }
                )
    return {image: known[(digests[image], scorer.name, model)] for image, _ in items}


def preference_pairs(
    run: RunRecipe, skill: str, paths: RunPaths, *, progress: Callable[[int, int], None] | None = None
) -> list[Pair]:
    """Draw (or reuse) the pair images of ``skill``'s train prompts, score them, pair them up (see
    the module docstring); writes ``pairs.jsonl`` and returns the pairs, prompts in id order."""
    from selma_toolkit.evaluate.generate import EvalJob, draw_eval_images

    out = dpo_paths(paths)
    prompts = sorted(read_prompts(paths.prompts(skill), split="train", repair_tail=True), key=lambda p: p.id)
    if not prompts:
        raise DatasetError(f"{paths.prompts(skill)}: no train prompts for the DPO pairs; run `selma prompts` first")
    seeds = pair_seeds(run)
    drawing = run.model_copy(update={"evaluate": run.evaluate.model_copy(update={"seeds": seeds})})
    job = EvalJob(PAIR_VARIANT, out.root / PAIR_IMAGES, None, {skill: prompts})
    items = draw_eval_images(drawing, [job], progress=progress)[PAIR_VARIANT][skill]
    scorer = load_judge(run.images) if scorer_name(run) == "judge" else build_scorer(scorer_name(run), run.evaluate)
    scores = _score_images(
        out.skill_dir(skill) / "scores.jsonl",
        scorer,
        [(Path(item.image), item.prompt) for item in items],
        run.evaluate.batch_size,
    )
    pairs: list[Pair] = []
    per_prompt = len(seeds)
    for index, prompt in enumerate(prompts):  # items: prompts in id order, seeds inner
        chunk = items[index * per_prompt : (index + 1) * per_prompt]
        images = [Path(item.image) for item in chunk]
        pairs.extend(pair_up(prompt.id, prompt.prompt, images, [scores[image] for image in images]))
    total = len(prompts) * run.dpo.pairs_per_prompt
    atomic_write_text(
        out.skill_dir(skill) / "pairs.jsonl",
        "".join(
            json.dumps(
                {
                    "prompt_id": p.prompt_id,
                    "text": p.text,
                    "winner": p.winner.relative_to(out.root).as_posix(),
                    "loser": p.loser.relative_to(out.root).as_posix(),
                    "winner_score": p.winner_score,
                    "loser_score": p.loser_score,
                    "scorer": scorer.name,
                }
            )
            + "\n"
            for p in pairs
        ),
    )
    log.info(
        "%s: %d preference pairs of %d (%d ties dropped), scorer %s",
        skill,
        len(pairs),
        total,
        total - len(pairs),
        scorer.name,
    )
    return pairs


# ---------------------------------------------------------------------------------------- loss


def dpo_loss(
    model_w: torch.Tensor, model_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor, beta: float
) -> torch.Tensor:
    """Diffusion-DPO: mean over pairs of -log sigmoid(-beta/2 ((e_w - r_w) - (e_l - r_l))); each
    argument [n]: the squared errors of the model (e) and the reference (r) on winners and losers."""
    inside = -0.5 * beta * ((model_w - ref_w) - (model_l - ref_l))
    return -F.logsigmoid(inside).mean()


def per_sample_errors(
    denoiser,
    noise_scheduler,
    cond: parts.Conditioning,
    draws: parts.Draws,
    latent_scale: parts.LatentScale | tuple[float, float],
    family: Family | None = None,
    guidance: float = 3.5,
) -> torch.Tensor:
    """[n] mean squared error per sample of the denoiser's prediction against its target (epsilon
    or v; the flow families' velocity noise - x0): ``diffusion_loss`` (train/model.py) before its
    batch mean. ``guidance``: FLUX.1-dev's guidance embedding, as in its denoising loss."""
    prediction, target = parts.prediction_and_target(
        denoiser, noise_scheduler, cond, draws, latent_scale, family, guidance
    )
    return (prediction.float() - target.float()).pow(2).flatten(1).mean(dim=1)


@contextlib.contextmanager
def reference_model(model: torch.nn.Module):
    """The model with its LoRA layers switched off (peft ``enable_adapters(False)``): the base."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in getattr(model, "module", model).modules() if isinstance(m, BaseTunerLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)  # also gives the LoRA parameters back their requires_grad


def pair_draws(generators: list[torch.Generator], latent_shape: tuple[int, ...], num_timesteps: int) -> parts.Draws:
    """Draws for [winners..., losers...]: one timestep and one noise per pair, shared by its two
    images; each image its own latent-sampling draw."""
    timesteps, noise, latent_w, latent_l = [], [], [], []
    for generator in generators:
        timesteps.append(torch.randint(0, num_timesteps, (1,), generator=generator))
        noise.append(torch.randn(latent_shape, generator=generator))
        latent_w.append(torch.randn(latent_shape, generator=generator))
        latent_l.append(torch.randn(latent_shape, generator=generator))
    t, eps = torch.cat(timesteps), torch.stack(noise)
    return parts.Draws(
        torch.cat([t, t]), torch.cat([eps, eps]), torch.cat([torch.stack(latent_w), torch.stack(latent_l)])
    )


# ---------------------------------------------------------------------------------------- training


def dpo_is_current(run: RunRecipe, paths: RunPaths, skill: str) -> tuple[bool, str]:
    """(done, detail) of one skill's DPO expert: its last checkpoint at dpo.steps and the file written."""
    out = dpo_paths(paths)
    saved = checkpoints(out.train_dir(skill))
    step = saved[-1].step if saved else 0
    done = step == run.dpo.steps and out.expert(skill).is_file()
    return done, f"step {step}/{run.dpo.steps}" + (", expert written" if out.expert(skill).is_file() else "")


def train_dpo_expert(run: RunRecipe, skill: str, paths: RunPaths, *, progress: Progress | None = None) -> Path:
    """The DPO expert of ``skill`` (pairs, then Diffusion-DPO; see the module docstring), resumable;
    returns ``<run>/dpo/experts/<skill>.safetensors``."""
    settings = variant_settings(
        run.train,
        learning_rate=run.dpo.learning_rate,
        steps=run.dpo.steps,
        batch_size=run.dpo.batch_size,
        checkpoint_every=run.dpo.checkpoint_every,
    )
    trained_run = with_train(run, settings)
    model_dir = parts.local_model_dir(run.base_model, run.revision)
    family = detect_family(str(model_dir))
    run.skill(skill)
    out = dpo_paths(paths)
    pairs = preference_pairs(
        run, skill, paths, progress=(lambda d, t: progress(TrainEvent("cache", d, t))) if progress else None
    )
    if not pairs:
        raise DatasetError(
            f"{out.skill_dir(skill)}: every preference pair of {skill} is a tie under "
            f"{scorer_name(run)}; nothing to learn from (raise dpo.pairs_per_prompt or use another dpo.scorer)"
        )
    samples = [TrainSample(p.winner, p.text, skill) for p in pairs] + [
        TrainSample(p.loser, p.text, skill) for p in pairs
    ]
    count = len(pairs)
    resolution = settings.resolution or run.images.resolution
    train_dir, output = out.train_dir(skill), out.expert(skill)
    digests = image_digests(samples)
    fingerprint = {
        **training_fingerprint(
            trained_run, f"{DPO}:{skill}", family.name, resolution, dataset_fingerprint(samples, digests)
        ),
        "dpo.beta": run.dpo.beta,
        "dpo.scorer": scorer_label(run),
    }
    fingerprint = json.loads(json.dumps(fingerprint))
    accelerator = make_accelerator(settings, train_dir)
    if finished(train_dir, fingerprint, settings.steps, f"{skill}.safetensors", output):
        return output
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    latent_cache, text_cache = build_caches(
        trained_run, samples, digests, model_dir, family, train_dir, accelerator, weight_dtype, progress
    )
    from accelerate.utils import set_seed

    set_seed(settings.seed)  # the LoRA's initial A, as train_expert seeds it
    trained, _, _ = build_models(settings, model_dir, family, device, weight_dtype, cache_text=True)
    denoiser = trained[family.denoiser]
    source = caches.ConditionSource(samples, resolution, device, latents=latent_cache, texts=text_cache, family=family)
    noise_scheduler = parts.load_noise_scheduler(model_dir, family)
    num_timesteps = noise_scheduler.config.num_train_timesteps
    latent_scale = parts.vae_latent_scale(model_dir, family)

    def micro_loss(models, step: int, slots: list[int]) -> torch.Tensor:
        model = models[family.denoiser]
        chosen = [sample_index(step * settings.batch_size + s, count, settings.seed) for s in slots]
        cond = source(chosen + [count + k for k in chosen])  # winners, then their losers
        draws = pair_draws(
            [sample_generator(settings.seed, step, s) for s in slots], tuple(cond.latent_mean.shape[1:]), num_timesteps
        )
        guidance = run.images.guidance_scale
        with torch.no_grad(), reference_model(model):  # first: re-enabling restores requires_grad
            reference = per_sample_errors(model, noise_scheduler, cond, draws, latent_scale, family, guidance)
        errors = per_sample_errors(model, noise_scheduler, cond, draws, latent_scale, family, guidance)
        n = len(slots)
        return dpo_loss(errors[:n], errors[n:], reference[:n], reference[n:], run.dpo.beta)

    def write_output(path: Path, steps: int) -> None:
        metadata = expert_metadata(run, skill, family, steps)
        metadata.update(
            {
                "selma.training": "diffusion-dpo",
                "selma.dpo": json.dumps(
                    {
                        "beta": run.dpo.beta,
                        "pairs": count,
                        "scorer": scorer_label(run),
                        "learning_rate": settings.learning_rate,
                    }
                ),
            }
        )
        lora = parts.lora_weights({family.denoiser: accelerator.unwrap_model(denoiser)}, metadata)
        save_lora(lora, path, format=settings.lora_format)

    log.info("%s: Diffusion-DPO on %d pairs, beta %g, %d steps", skill, count, run.dpo.beta, settings.steps)
    return run_steps(
        accelerator=accelerator,
        settings=settings,
        models={family.denoiser: denoiser},
        train_dir=train_dir,
        fingerprint=fingerprint,
        output_name=f"{skill}.safetensors",
        micro_loss=micro_loss,
        write_output=write_output,
        output=output,
        progress=progress,
    )


def dpo_merged(run: RunRecipe, paths: RunPaths) -> Path:
    """``<run>/dpo/merged/<merge.method>.safetensors``: the DPO experts merged (the variant ``dpo``)."""
    return dpo_paths(paths).merged(run.merge.method)


def merge_dpo(run: RunRecipe, paths: RunPaths) -> Path:
    """Merge every skill's DPO expert with the recipe's merge settings."""
    out = dpo_paths(paths)
    merge_files(
        [out.expert(s.name) for s in run.skills],
        dpo_merged(run, paths),
        run.merge.method,  # type: ignore[arg-type]
        run.merge.weights,
        run.merge.rank,
        format=run.train.lora_format,
        density=run.merge.density,
        seed=run.merge.seed,
    )
    return dpo_merged(run, paths)


def dpo_merge_is_current(run: RunRecipe, paths: RunPaths) -> bool:
    """The merged DPO file records exactly the current DPO experts (sha256)."""
    from safetensors import SafetensorError, safe_open

    path = dpo_merged(run, paths)
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as handle:
            record = metadata_record(handle.metadata() or {}) or {}
    except (SafetensorError, OSError, ValueError):
        return False
    experts = [dpo_paths(paths).expert(s.name) for s in run.skills]
    return all(p.is_file() for p in experts) and [e.get("sha256") for e in record.get("experts", [])] == [
        sha256_file(p) for p in experts
    ]


def train_dpo(run: RunRecipe, paths: RunPaths, *, progress: Callable[[str, object], None] | None = None) -> Path:
    """Every skill's DPO expert, then their merge (the run's variant ``dpo``); returns the merged file."""
    for skill in run.skills:
        if not dpo_is_current(run, paths, skill.name)[0]:
            train_dpo_expert(
                run, skill.name, paths, progress=(lambda e, s=skill.name: progress(s, e)) if progress else None
            )
    if not dpo_merge_is_current(run, paths):
        merge_dpo(run, paths)
    return dpo_merged(run, paths)
