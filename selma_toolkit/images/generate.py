"""Stage 2: one image per train prompt, drawn by the text-to-image model itself (or by another
model: weak-to-strong), written as a Hugging Face ``imagefolder`` dataset.

Layout of ``RunPaths.images(skill)``::

    000017.png                image of prompt id 17 (or .jpg)
    000017.txt                its caption, for kohya-style tools
    metadata.jsonl            {"file_name", "text", "prompt_id", "skill", "seed", "model", "steps",
                               "guidance", "resolution", "negative_prompt"} per image (best-of-N
                               also "judge", "chosen" and every candidate's "seed" and "score")
    000017.judge.json         best-of-N only (``images.candidates`` > 1, best_of.py): the candidates' scores
    .selma-generation.json    the settings the images were drawn with (a resume must match them)

Reproducibility: the seed of an image is :func:`image_seed` of the base seed and the prompt id,
drawn with a CPU generator (the same initial noise on every device). Batches hold fixed prompts
(see shard.py), so an image is bit-for-bit the same after a resume or with any number of processes,
on the same device, dtype and CPU thread count; alone versus batched (or with another thread
count) it differs by float rounding only (about 1e-6, a level of 8-bit colour here and there).

Resume and kill -9: an image is written atomically, then its caption atomically; the caption is
the commit mark. A prompt is done when its caption holds the prompt's text and its image decodes;
a rerun redraws the batches that hold a prompt that is not done. ``metadata.jsonl`` is not
appended to during the run: it is a pure function of the prompts, the settings and the finished
images, written whole (atomically) by the main process after every process has finished. So a
kill loses at most the batch in flight, and no row is ever duplicated or points at a missing image.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selma_toolkit.config.recipes import RunRecipe
from selma_toolkit.dataset import METADATA, PromptRecord, read_prompts
from selma_toolkit.errors import DatasetError, ModelError, Remedy
from selma_toolkit.images import best_of, shard
from selma_toolkit.images.naming import image_name, image_seed
from selma_toolkit.io import atomic_write_bytes, atomic_write_text, read_jsonl
from selma_toolkit.models import default_dtype, detect_family, load_pipeline, pipeline_family, resolve_model
from selma_toolkit.paths import RunPaths
from selma_toolkit.recipe import write_resolved_recipe

log = logging.getLogger(__name__)

SETTINGS_FILE = ".selma-generation.json"
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class ImageStats:
    """What one call of :func:`generate_images` did, summed over all processes."""

    skill: str
    folder: Path
    prompts: int  # train prompts in the prompt file
    images: int  # rows in metadata.jsonl at the end
    generated: int  # images drawn and written by this call
    skipped: int  # prompts whose image was already there and valid
    blacked_out: list[int]  # prompt ids the safety checker blacked out: counted, never written
    seconds: float  # drawing time (model loading excluded) of the slowest process
    per_process: list[int]  # images written by each process

    @property
    def images_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds > 0 else 0.0


def check_image_inputs(run: RunRecipe, skill: str, paths: RunPaths) -> list[PromptRecord]:
    """The train prompts of ``skill`` in id order, after checking everything that can be checked
    without loading a model: the skill, its prompt file, and that the image model is an SD 1.x /
    2.x / XL folder, Hub id or single-file checkpoint that may be loaded (no pickles).
    Cheap (no torch import for local models), so a command can check every skill before drawing."""
    run.skill(skill)  # a clear error when the run has no such skill
    prompt_file = paths.prompts(skill)
    prompts = sorted(read_prompts(prompt_file, split="train"), key=lambda p: p.id)
    if not prompts:
        raise DatasetError(
            f"{prompt_file}: no prompts with split 'train'; expected at least one to draw "
            "(held-out prompts are for evaluation only)"
        )
    _check_model(run)
    return prompts


def generate_images(
    run: RunRecipe,
    skill: str,
    paths: RunPaths,
    *,
    progress: ProgressCallback | None = None,
) -> ImageStats:
    """Draw one image per train prompt of ``skill`` into ``paths.images(skill)``; resume a
    stopped run. In a multi-process launch each process draws its share (shard.py).

    ``progress(done, total)`` is called in each process for its own share: once before drawing,
    then after each batch. Raises DatasetError (prompt file), ModelError (model) or RecipeError.
    """
    settings = run.images
    prompts = check_image_inputs(run, skill, paths)
    state = shard.process_state()
    device = shard.local_device(state)
    folder = paths.images(skill)
    recorded = _settings_record(run, device)
    _check_settings(folder, recorded)
    if state.is_main_process:
        _prepare_folder(folder, recorded)
        write_resolved_recipe(run, paths.root)
    state.wait_for_everyone()

    batches = shard.batches_for_process(prompts, settings.batch_size, state.process_index, state.num_processes)
    pending = [(batch, {p.id for p in batch if not _is_done(folder, p, settings)}) for batch in batches]
    pending = [(batch, missing) for batch, missing in pending if missing]
    total = sum(len(missing) for _, missing in pending)
    skipped = sum(len(batch) for batch in batches) - total
    log.info(
        "%s: process %d/%d draws %d image(s); %d already there",
        skill,
        state.process_index + 1,
        state.num_processes,
        total,
        skipped,
    )
    generated, blacked_out, done = 0, [], 0
    pipe = _load_generation_pipeline(run, device) if pending else None
    judge = best_of.load_judge(settings, device) if pending and settings.candidates > 1 else None
    started = time.perf_counter()  # after loading: the rate counts drawing only
    if progress:
        progress(0, total)
    for batch, missing in pending:
        if judge is None:
            images, flagged = _draw(pipe, batch, run)
            records: list[dict | None] = [None] * len(batch)
        else:
            images, flagged, records = best_of.draw_best(pipe, batch, run, judge, _draw)
        for prompt, image, is_flagged, record in zip(batch, images, flagged, records):
            if prompt.id not in missing:
                continue  # already on disk: the batch was redrawn only to keep its members fixed
            if is_flagged:
                blacked_out.append(prompt.id)
                continue
            _write_example(folder, prompt, image, settings.image_format, record)
            generated += 1
        done += len(missing)
        if progress:
            progress(done, total)
    seconds = time.perf_counter() - started

    per_process = shard.gather(state, (generated, skipped, blacked_out, seconds))
    if state.is_main_process:
        _write_metadata(folder, prompts, run, skill)
    state.wait_for_everyone()
    rows = len(read_jsonl(folder / METADATA))
    stats = ImageStats(
        skill=skill,
        folder=folder,
        prompts=len(prompts),
        images=rows,
        generated=sum(p[0] for p in per_process),
        skipped=sum(p[1] for p in per_process),
        blacked_out=sorted(i for p in per_process for i in p[2]),
        seconds=max(p[3] for p in per_process),
        per_process=[p[0] for p in per_process],
    )
    if stats.blacked_out and state.is_main_process:
        log.warning(
            "%s: the safety checker blacked out %d image(s) (prompt ids %s); they are not in the dataset",
            skill,
            len(stats.blacked_out),
            stats.blacked_out[:20],
        )
    return stats


# ------------------------------------------------------------------------------------ the model


def _model_revision(run: RunRecipe) -> str | None:
    # The recipe's revision belongs to base_model; a separate generation model uses its default branch.
    return run.revision if run.images.model is None else None


def _check_model(run: RunRecipe) -> None:
    """Fail before any work on a model that cannot be loaded safely; warn about a negative prompt it ignores."""
    source = resolve_model(run.image_model)
    if source.endswith(".safetensors"):
        if run.images.single_file_config is None:
            raise ModelError(
                f"the image model {run.image_model!r} is a single-file checkpoint; set "
                "images.single_file_config to a local diffusers folder (or tiny:<arch>) of the same "
                "architecture, so that no config is fetched at run time"
            )
        return
    family = detect_family(run.image_model, revision=_model_revision(run))
    if run.images.negative_prompt and not family.negative_prompt:
        log.warning(
            "images.negative_prompt is set, but %s pipelines take no negative prompt for their guidance "
            "(Flux's guidance_scale is an embedded guidance; FLUX.2 [klein] has no negative prompt); the images "
            "are drawn without it",
            family.title,
        )


def _load_generation_pipeline(run: RunRecipe, device: str):
    settings = run.images
    pipe = load_pipeline(
        run.image_model,
        revision=_model_revision(run),
        device=device,
        dtype=settings.dtype,
        scheduler=settings.scheduler,
        safety_checker=settings.safety_checker,
        config=settings.single_file_config,
        attention_slicing=settings.attention_slicing,
        vae_tiling=settings.vae_tiling,
        cpu_offload=settings.cpu_offload,
    )
    if settings.safety_checker and getattr(pipe, "safety_checker", None) is None:
        raise ModelError(
            f"images.safety_checker = true, but {run.image_model!r} has no safety checker (only SD 1.x "
            "pipelines ship one); set images.safety_checker = false or use a model that has one"
        )
    return pipe


def _draw(
    pipe, batch: Sequence[PromptRecord], run: RunRecipe, seeds: Sequence[int] | None = None
) -> tuple[list[Any], list[bool]]:
    """One pipeline call for a batch: its PIL images and, per image, whether it was blacked out.
    ``seeds``: one per prompt (best-of-N's candidates); default ``image_seed(images.seed, prompt id)``."""
    import torch

    settings = run.images
    seeds = seeds if seeds is not None else [image_seed(settings.seed, p.id) for p in batch]
    generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
    # The family names the guidance argument and whether a negative prompt goes with it.
    guidance = pipeline_family(pipe).pipeline_arguments(settings.negative_prompt, settings.guidance_scale, len(batch))
    output = pipe(
        prompt=[p.prompt for p in batch],
        **guidance,
        num_inference_steps=settings.steps,
        height=settings.resolution,
        width=settings.resolution,
        generator=generators,
        output_type="pil",
    )
    flagged = getattr(output, "nsfw_content_detected", None) or [False] * len(batch)
    return output.images, [bool(f) for f in flagged]


# ----------------------------------------------------------------------------------- the folder


def _settings_record(run: RunRecipe, device: str) -> dict[str, Any]:
    """Every setting that changes the pixels; images drawn with other values must not be mixed in."""
    settings = run.images
    return {
        "model": run.image_model,
        "revision": _model_revision(run),
        "steps": settings.steps,
        "guidance_scale": settings.guidance_scale,
        "resolution": settings.resolution,
        "negative_prompt": settings.negative_prompt,
        "seed": settings.seed,
        "scheduler": settings.scheduler,
        "dtype": str(default_dtype(device, settings.dtype)).removeprefix("torch."),
        "image_format": settings.image_format,
        # Only for best-of-N, so that folders drawn before these settings existed still resume.
        **(
            {"candidates": settings.candidates, "judge": best_of.judge_label(settings)}
            if settings.candidates > 1
            else {}
        ),
    }


def _check_settings(folder: Path, recorded: dict[str, Any]) -> None:
    path = folder / SETTINGS_FILE
    if not path.is_file():
        return
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise DatasetError(
            f"{path}: not valid JSON; delete it only if every image in {folder} was drawn with the current settings"
        ) from None
    changed = {k: (previous.get(k), v) for k, v in recorded.items() if previous.get(k) != v}
    if changed:
        shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise DatasetError(
            what=f"holds images drawn with other settings ({shown}); resuming would mix them",
            where=str(folder),
            remedies=[
                Remedy.do("restore those settings"),
                Remedy.change("out", "folder"),
                Remedy.do("delete the folder to start over"),
            ],
        )


def _prepare_folder(folder: Path, recorded: dict[str, Any]) -> None:
    """Record the settings and drop temporary files left by a killed run (main process, before drawing)."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / SETTINGS_FILE, json.dumps(recorded, indent=2) + "\n")
    for stale in folder.glob(".*.tmp"):
        stale.unlink(missing_ok=True)


def _decodes(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()  # a full decode: verify() alone misses truncated JPEGs
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def _has_caption(folder: Path, prompt: PromptRecord) -> bool:
    caption = folder / image_name(prompt.id, "txt")
    return caption.is_file() and caption.read_text(encoding="utf-8") == prompt.prompt


def _is_done(folder: Path, prompt: PromptRecord, settings) -> bool:
    name = image_name(prompt.id, settings.image_format)
    return (
        _has_caption(folder, prompt)
        and _decodes(folder / name)
        and (settings.candidates == 1 or best_of.read_record(folder, name) is not None)
    )


def _write_example(folder: Path, prompt: PromptRecord, image, image_format: str, record: dict | None = None) -> None:
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format="JPEG", quality=95)
    atomic_write_bytes(folder / image_name(prompt.id, image_format), buffer.getvalue())
    if record is not None:
        best_of.write_record(folder, image_name(prompt.id, image_format), record)
    # The caption last: it marks the example as finished (a kill before it means "redraw").
    atomic_write_text(folder / image_name(prompt.id, "txt"), prompt.prompt)


def _write_metadata(folder: Path, prompts: Sequence[PromptRecord], run: RunRecipe, skill: str) -> None:
    """Rewrite metadata.jsonl whole: one row per finished example, in prompt-id order."""
    settings = run.images
    lines = []
    for prompt in prompts:
        name = image_name(prompt.id, settings.image_format)
        # Every process checked (or just wrote) its own images this run; here existence suffices.
        if not (_has_caption(folder, prompt) and (folder / name).is_file()):
            continue
        row = {
            "file_name": name,
            "text": prompt.prompt,
            "prompt_id": prompt.id,
            "skill": skill,
            "seed": image_seed(settings.seed, prompt.id),
            "model": run.image_model,
            "steps": settings.steps,
            "guidance": settings.guidance_scale,
            "resolution": settings.resolution,
            "negative_prompt": settings.negative_prompt,
        }
        record = best_of.read_record(folder, name) if settings.candidates > 1 else None
        if record is not None:
            row.update(
                seed=record["candidates"][record["chosen"]]["seed"],
                judge=record["judge"],
                chosen=record["chosen"],
                candidates=record["candidates"],
            )
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    atomic_write_text(folder / METADATA, "".join(lines))
    known = {image_name(p.id, settings.image_format) for p in prompts}
    orphans = [p.name for p in folder.glob(f"*.{settings.image_format}") if p.name not in known]
    if orphans:
        log.warning(
            "%s: %d image(s) belong to no train prompt of %s (e.g. %s); left in place, not in %s",
            folder,
            len(orphans),
            skill,
            sorted(orphans)[0],
            METADATA,
        )
