"""Evaluation images of a run, with fixed seeds, on held-out prompts only; then scores and the report.

A *variant* is the base model or the base model with one LoRA: ``base``, ``expert:<skill>``,
``joint`` (the mixture baseline) and ``merged:<method>``; the paper's Table 4 baselines ``moe``
(a MoE-LoRA file: experts + gate, attached by selma_toolkit.adapters.moe) and ``dpo`` (the merged
DPO experts). Every variant draws every skill's
held-out prompts (``evaluate.prompts_per_skill`` of them, split ``heldout`` in the prompt file:
never a prompt that was trained on) once per seed in ``evaluate.seeds``.

Paired noise: the image of (prompt id p, evaluation seed s) is drawn from
``image_seed(s, p)`` (selma_toolkit.images) in every variant, so base and merged images of a
prompt differ only by the LoRA, as the paper's side-by-side comparisons need.

Layout of a job folder (``eval/images/<variant>/`` for the run, ``eval/checkpoints/<skill>/images/
step-N/`` for checkpoint selection)::

    <skill>/<prompt id:06d>-seed<s>.png   written atomically: a file that exists is complete
    .selma-eval.json                      the LoRA's sha256 and the generation settings

Resume: a folder's images are reused while its LoRA file and the generation settings are
unchanged; otherwise the folder is emptied and drawn again. One pipeline is loaded per call; each
LoRA is attached through the diffusers adapter, used, and removed (``unload_lora_weights``
restores the base weights exactly).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selma_toolkit.config.recipes import RunRecipe
from selma_toolkit.dataset import PromptRecord, read_prompts
from selma_toolkit.errors import DatasetError
from selma_toolkit.evaluate.report import write_report
from selma_toolkit.evaluate.scorers import build_scorers
from selma_toolkit.evaluate.scoring import EvalItem, score_variants, variant_folder
from selma_toolkit.images import image_seed
from selma_toolkit.io import atomic_write_bytes, atomic_write_text, sha256_file
from selma_toolkit.models import load_pipeline, pipeline_family
from selma_toolkit.paths import RunPaths
from selma_toolkit.prompts.filters import normalized

log = logging.getLogger(__name__)

MANIFEST = ".selma-eval.json"
EVALUATION_RECORD = "evaluation.json"
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class EvalJob:
    """One variant's images: where they go, the LoRA to attach (None: the base model), the prompts."""

    variant: str
    folder: Path
    lora: Path | None
    prompts: Mapping[str, Sequence[PromptRecord]]


def heldout_prompts(run: RunRecipe, paths: RunPaths) -> dict[str, list[PromptRecord]]:
    """The first ``evaluate.prompts_per_skill`` held-out prompts of every skill, in id order.

    A held-out prompt whose text also appears among the skill's training prompts is left out
    (the prompt stage's de-duplication makes this rare), so evaluation never sees a trained prompt.
    """
    wanted = run.evaluate.prompts_per_skill
    chosen: dict[str, list[PromptRecord]] = {}
    for skill in run.skills:
        path = paths.prompts(skill.name)
        records = read_prompts(path, repair_tail=True)
        trained = {normalized(r.prompt) for r in records if r.split == "train"}
        heldout = sorted((r for r in records if r.split == "heldout"), key=lambda r: r.id)
        clean = [r for r in heldout if normalized(r.prompt) not in trained]
        if len(clean) < len(heldout):
            log.warning(
                "%s: %d held-out prompt(s) repeat a training prompt and are not evaluated",
                skill.name,
                len(heldout) - len(clean),
            )
        if len(clean) < wanted:
            raise DatasetError(
                f"{path}: {len(clean)} usable held-out prompt(s), evaluate.prompts_per_skill asks for {wanted}; "
                "run `selma prompts` (or `selma run`) for this skill to add them, or lower evaluate.prompts_per_skill"
            )
        chosen[skill.name] = clean[:wanted]
    return chosen


def generation_settings(run: RunRecipe) -> dict[str, Any]:
    """Every setting that changes an evaluation image besides the LoRA and the seed."""
    images = run.images
    return {
        "model": run.base_model,
        "revision": run.revision,
        "steps": images.steps,
        "guidance_scale": images.guidance_scale,
        "resolution": images.resolution,
        "negative_prompt": images.negative_prompt,
        "scheduler": images.scheduler,
        "dtype": images.dtype,
    }


def lora_digest(path: Path | None) -> str | None:
    """sha256 of a LoRA file (None for the base model)."""
    return None if path is None else sha256_file(path)


def image_path(folder: Path, skill: str, prompt_id: int, seed: int) -> Path:
    """Where the image of (prompt, evaluation seed) of a job folder lies."""
    return folder / skill / f"{prompt_id:06d}-seed{seed}.png"


def draw_eval_images(
    run: RunRecipe,
    jobs: Sequence[EvalJob],
    *,
    device: str | None = None,
    progress: ProgressCallback | None = None,
    seeds: Sequence[int] | None = None,
) -> dict[str, dict[str, list[EvalItem]]]:
    """Draw the missing images of every job (one pipeline for all); return
    ``{variant: {skill: [EvalItem]}}`` for score_variants, prompts in id order, seeds inner.
    Two jobs of one variant must not share a skill. ``seeds``: the evaluation seeds (default
    ``evaluate.seeds``; a benchmark's protocol names its own)."""
    seeds = list(run.evaluate.seeds if seeds is None else seeds)
    settings = generation_settings(run)
    missing: list[tuple[EvalJob, list[tuple[str, PromptRecord, int]]]] = []
    for job in jobs:
        manifest = {
            "variant": job.variant,
            "lora": str(job.lora) if job.lora else None,
            "lora_sha256": lora_digest(job.lora),
            "settings": settings,
        }
        _prepare_folder(job.folder, manifest)
        todo = [
            (skill, prompt, seed)
            for skill, prompts in job.prompts.items()
            for prompt in prompts
            for seed in seeds
            if not image_path(job.folder, skill, prompt.id, seed).is_file()
        ]
        if todo:
            missing.append((job, todo))
    total = sum(len(todo) for _, todo in missing)
    if progress:
        progress(0, total)
    if missing:
        _draw_missing(run, missing, device, total, progress)
    items: dict[str, dict[str, list[EvalItem]]] = {}
    for job in jobs:  # jobs of one variant name for different skills (checkpoint selection) share its table
        table = items.setdefault(job.variant, {})
        for skill, prompts in job.prompts.items():
            table[skill] = [
                EvalItem(image_path(job.folder, skill, p.id, seed), p.prompt, seed, p.id)
                for p in prompts
                for seed in seeds
            ]
    return items


def _prepare_folder(folder: Path, manifest: dict[str, Any]) -> None:
    """Empty ``folder`` when its images were drawn with another LoRA or other settings."""
    path = folder / MANIFEST
    previous = None
    if path.is_file():
        try:
            previous = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            previous = None
    keys = ("lora_sha256", "settings")
    if previous is not None and all(previous.get(k) == manifest[k] for k in keys):
        return
    if folder.exists():
        log.info("%s: drawn with another LoRA or other settings; drawing it again", folder)
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    atomic_write_text(path, json.dumps(manifest, indent=1) + "\n")


def _draw_missing(run: RunRecipe, missing, device: str | None, total: int, progress: ProgressCallback | None) -> None:
    import torch

    from selma_toolkit.adapters.diffusers import load_experts
    from selma_toolkit.adapters.moe import is_moe_file, load_moe, unload_moe

    images = run.images
    pipe = load_pipeline(
        run.base_model, revision=run.revision, device=device, dtype=images.dtype, scheduler=images.scheduler
    )
    family = pipeline_family(pipe)  # names the guidance argument and whether a negative prompt goes with it
    done = 0
    for job, todo in missing:
        moe = job.lora is not None and is_moe_file(job.lora)
        if moe:
            load_moe(pipe, job.lora)  # the experts and their gate, kept apart (T LoRAs per layer)
        elif job.lora is not None:
            # A UNet-only expert makes diffusers warn on every load that the text encoder has no LoRA
            # keys ("safe to ignore"); one line per variant would bury the run's own messages.
            lora_base = logging.getLogger("diffusers.loaders.lora_base")
            level = lora_base.level
            lora_base.setLevel(logging.ERROR)
            try:
                load_experts(pipe, [job.lora], method="selma", adapter_name="selma_eval")
            finally:
                lora_base.setLevel(level)
        try:
            for start in range(0, len(todo), images.batch_size):
                batch = todo[start : start + images.batch_size]
                output = pipe(
                    prompt=[prompt.prompt for _, prompt, _ in batch],
                    **family.pipeline_arguments(images.negative_prompt, images.guidance_scale, len(batch)),
                    num_inference_steps=images.steps,
                    height=images.resolution,
                    width=images.resolution,
                    generator=[
                        torch.Generator("cpu").manual_seed(image_seed(seed, prompt.id)) for _, prompt, seed in batch
                    ],
                    output_type="pil",
                )
                for (skill, prompt, seed), image in zip(batch, output.images):
                    buffer = io.BytesIO()
                    image.save(buffer, format="PNG")
                    atomic_write_bytes(image_path(job.folder, skill, prompt.id, seed), buffer.getvalue())
                done += len(batch)
                if progress:
                    progress(done, total)
        finally:
            if moe:
                unload_moe(pipe)
            elif job.lora is not None:
                pipe.unload_lora_weights()
    log.info("drew %d evaluation image(s)", total)


# ------------------------------------------------------------------------------ the whole run


def evaluation_signature(
    run: RunRecipe, variants: Mapping[str, Path | None], prompts: Mapping[str, Sequence[PromptRecord]]
) -> dict[str, Any]:
    """What a finished evaluation depends on: each variant's LoRA (sha256), the prompts, seeds,
    scorers and generation settings. Equal signatures: the scores and report are up to date."""
    return {
        "variants": {variant: lora_digest(lora) for variant, lora in sorted(variants.items())},
        "prompts": {skill: [[p.id, p.prompt] for p in records] for skill, records in prompts.items()},
        "seeds": list(run.evaluate.seeds),
        "scorers": {s.name: getattr(s, "cache_key", s.model_id) for s in build_scorers(run.evaluate)},
        "settings": generation_settings(run),
        "report": {
            "prompts_per_skill": run.evaluate.report_prompts_per_skill,
            "human_eval_pairs": run.evaluate.human_eval_pairs,
        },
    }


def evaluation_is_current(run: RunRecipe, paths: RunPaths, variants: Mapping[str, Path | None]) -> bool:
    """Whether scores.json and the report were made from exactly these variants and settings."""
    record = paths.eval_dir / EVALUATION_RECORD
    if not (record.is_file() and paths.report.is_file() and (paths.eval_dir / "scores.json").is_file()):
        return False
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
        return saved == evaluation_signature(run, variants, heldout_prompts(run, paths))
    except (json.JSONDecodeError, DatasetError):
        return False


def _lora_notes(paths: RunPaths, variants: Mapping[str, Path | None]) -> dict[str, str]:
    """What each variant's LoRA file is, for the report: its path in the run folder, and for an expert
    that is a selected checkpoint, its step and why it was chosen (from the checkpoint selection)."""
    selection: dict[str, Any] = {}
    try:
        if paths.selection.is_file():
            selection = json.loads(paths.selection.read_text(encoding="utf-8"))["skills"]
    except (json.JSONDecodeError, KeyError, TypeError):
        selection = {}  # a damaged selection is refused where it is used; the report only leaves the note out
    notes = {}
    for variant, lora in variants.items():
        if lora is None:
            continue
        shown = lora.relative_to(paths.root).as_posix() if lora.is_relative_to(paths.root) else str(lora)
        entry = selection.get(variant.removeprefix("expert:")) if variant.startswith("expert:") else None
        if entry and entry.get("expert") == shown:
            means = ", ".join(
                f"step {c['step']}: " + ("-" if c.get("mean") is None else f"{c['mean']:.4g}")
                for c in entry.get("checkpoints", [])
            )
            notes[variant] = (
                f"the checkpoint of step {entry['best_step']} ({shown}), the best by "
                f"{entry['metric']} on the held-out prompts ({means})"
            )
        elif variant.startswith("expert:") and lora == paths.expert(variant.removeprefix("expert:")):
            notes[variant] = f"{shown} (the final expert)"
        else:
            notes[variant] = shown
    return notes


def evaluate_variants(
    run: RunRecipe,
    paths: RunPaths,
    variants: Mapping[str, Path | None],
    *,
    progress: ProgressCallback | None = None,
) -> Path:
    """Draw (or reuse) every variant's images on the held-out prompts, score them (scores.json,
    scores.csv, summary.csv in ``paths.eval_dir``) and write the report; return its index.html."""
    settings = run.evaluate
    scorers = build_scorers(settings)  # checks every scorer setting before anything is drawn
    prompts = heldout_prompts(run, paths)
    jobs = [
        EvalJob(variant, paths.eval_dir / "images" / variant_folder(variant), lora, prompts)
        for variant, lora in variants.items()
    ]
    items = draw_eval_images(run, jobs, progress=progress)
    score_variants(
        items, scorers, paths.eval_dir, bootstrap_samples=settings.bootstrap_samples, batch_size=settings.batch_size
    )
    index = write_report(
        paths.eval_dir,
        paths.report.parent,
        title=f"SELMA evaluation: {run.name}",
        prompts_per_skill=settings.report_prompts_per_skill,
        human_eval_pairs=settings.human_eval_pairs or None,
        note=settings.report_note,
        loras=_lora_notes(paths, variants),
    )
    atomic_write_text(
        paths.eval_dir / EVALUATION_RECORD,
        json.dumps(evaluation_signature(run, variants, prompts), indent=1, ensure_ascii=False) + "\n",
    )
    return index
