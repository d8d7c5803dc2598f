"""`toy:judge`: a small contrastive image-text model of the shapes world, a judge that is not the scorer.

The exact segmentation scorer (scorer.py) is the shapes world's evaluation; a study that picks
training images with it measures an upper bound, not a method. ``toy:judge`` is what a user would
have instead: a CLIP (transformers' ``CLIPModel`` with tiny configs, so the ``clipscore`` scorer
and every CLIP code path load it unchanged) trained here on ground-truth renders and their
captions, with hard-negative captions that are false of the image by one skill's worth:

* a count off by one (``three red circles`` -> ``two red circles``; never down to one object,
  which is true of more),
* colours swapped between two objects of different shapes, or one colour changed,
* a relation reversed (``left of`` -> ``right of``, ``above`` -> ``below``), else a shape changed,

so that the contrastive loss rewards the skills and not only the shapes present. Images are
renders (renderer.py) lightly degraded (pixel noise, sometimes a 3x3 blur), as a diffusion model's
32x32 images are never clean. Captions come from the pretraining grammars (the three toy skills
and single objects) with the judge's own seed; every caption, and every negative, that is a
held-out or development prompt of the study recipe named by ``exclude_recipe`` is left out, so
the judge never sees a prompt its study measures on.

Training is a pure function of its settings, like pretrain.py: step ``i``'s captions, placements,
negatives, degradations come from generators seeded by (seed, i); it checkpoints (safetensors and
state.json, no pickles) every ``checkpoint_every`` steps and resumes exactly. The export
(fp16 safetensors, the processor files and ``toyworld-judge.json`` with the settings and rebuild
command) ships as package data in ``selma_toolkit/toyworld/judge/`` and is named ``toy:judge``.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from selma_toolkit.dataset import read_prompts
from selma_toolkit.errors import Option, RecipeError, Remedy, TrainingError
from selma_toolkit.io import JsonlAppender, atomic_write_text
from selma_toolkit.paths import RunPaths
from selma_toolkit.prompts import generate_prompts
from selma_toolkit.prompts.filters import normalized
from selma_toolkit.prompts.grammar import GrammarSource
from selma_toolkit.recipe import load_run_recipe
from selma_toolkit.toyworld.model import MAX_TOKENS, toy_tokenizer
from selma_toolkit.toyworld.pretrain import (
    caption_sources,
    draw_batch,
    flatten_optimizer,
    restore_optimizer,
    save_checkpoint,
    step_generator,
)
from selma_toolkit.toyworld.study_data import dev_prompts
from selma_toolkit.toyworld.world import (
    COLORS,
    IMAGE_SIZE,
    RELATIONS,
    SHAPES,
    Group,
    Scene,
    try_parse_caption,
)

log = logging.getLogger(__name__)

JUDGE_SPEC = "toy:judge"
JUDGE_DIR = Path(__file__).resolve().parent / "judge"
RECORD_FILE = "toyworld-judge.json"
STATE_FILE = "state.json"
NEGATIVE_KINDS = ("count", "color", "relation")
IMAGE_MEAN = [0.5, 0.5, 0.5]  # pixels in [-1, 1], as the renders are drawn for training
IMAGE_STD = [0.5, 0.5, 0.5]


class JudgeSettings(BaseModel):
    """Everything a judge training run depends on (recorded in its checkpoint; a resume must match)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = 0
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(64, ge=2)
    learning_rate: float = Field(5e-4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    checkpoint_every: int = Field(500, ge=1)
    # Pixel noise std drawn uniformly in [0, noise] per image; a 3x3 blur with probability blur.
    noise: float = Field(0.1, ge=0)
    blur: float = Field(0.5, ge=0, le=1)
    # The study recipe whose held-out and development prompts the judge must never see.
    exclude_recipe: str | None = None

    def __init__(self, **values) -> None:
        try:
            super().__init__(**values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))} = {e.get('input')!r}: {e['msg']}" for e in exc.errors()
            )
            raise RecipeError(f"judge settings: {problems}") from None


# Changing these between a run and its resumption does not change what was computed so far.
RESUMABLE = ("steps", "checkpoint_every")


# ------------------------------------------------------------------------------------ captions


def scene_caption(scene: Scene) -> str:
    """The grammar's caption of a scene (world.parse_caption's inverse, up to a/an/one)."""
    words = {1: "a", 2: "two", 3: "three", 4: "four"}

    def phrase(group: Group) -> str:
        noun = group.shape + ("s" if group.count > 1 else "")
        article = words[group.count]
        return " ".join(part for part in (article, group.color, noun) if part)

    if scene.relation is not None:
        relation = next(words for words, key in RELATIONS.items() if key == scene.relation)
        return f"{phrase(scene.groups[0])} {relation} {phrase(scene.groups[1])}"
    return " and ".join(phrase(group) for group in scene.groups)


def _replace(scene: Scene, index: int, **change: Any) -> Scene:
    groups = list(scene.groups)
    groups[index] = Group(**{**groups[index].__dict__, **change})
    return Scene(tuple(groups), scene.relation)


def _other_shape(scene: Scene, rng: random.Random) -> Scene:
    """One group's shape changed to a shape the scene does not name (always false of the image)."""
    index = rng.randrange(len(scene.groups))
    unused = [s for s in SHAPES if s not in {g.shape for g in scene.groups}]
    return _replace(scene, index, shape=rng.choice(unused))


def hard_negative(scene: Scene, kind: str, rng: random.Random) -> Scene:
    """A scene false of every image of ``scene`` by one ``kind`` of fact (see the module docstring)."""
    if kind == "count" and scene.relation is None:
        index = rng.randrange(len(scene.groups))
        count = scene.groups[index].count
        # Never down to one: "a yellow diamond" is true of two yellow diamonds (there is one).
        options = [c for c in (count - 1, count + 1) if c >= 2 and scene.num_objects - count + c <= 4]
        if options:
            return _replace(scene, index, count=rng.choice(options))
    if kind == "color":
        coloured = [i for i, g in enumerate(scene.groups) if g.color]
        pairs = [
            (i, j)
            for i in coloured
            for j in coloured
            if i < j
            and scene.groups[i].color != scene.groups[j].color
            and scene.groups[i].shape != scene.groups[j].shape
        ]
        if coloured and (not pairs or rng.random() < 0.3):  # one colour changed (what a swap cannot reach)
            index = rng.choice(coloured)
            return _replace(scene, index, color=rng.choice([c for c in COLORS if c != scene.groups[index].color]))
        if pairs:  # colours bound to the wrong shapes: the binding error
            i, j = rng.choice(pairs)
            swapped = _replace(scene, i, color=scene.groups[j].color)
            return _replace(swapped, j, color=scene.groups[i].color)
    if kind == "relation" and scene.relation is not None:
        reverse = {"left": "right", "right": "left", "above": "below", "below": "above"}
        return Scene(scene.groups, reverse[scene.relation])
    return _other_shape(scene, rng)


def step_examples(grammars: list[Any], settings: JudgeSettings, step: int, excluded: set[str]):
    """Step ``step``'s captions, their renders ([n, 3, 32, 32] in [-1, 1]) and hard negatives
    (``[n][len(NEGATIVE_KINDS)]`` captions): a pure function of (seed, step)."""

    rng = random.Random(f"toyworld-judge:{settings.seed}:{step}")
    captions: list[str] = []
    while len(captions) < settings.batch_size:
        grammar = rng.choice(grammars)
        caption = GrammarSource(grammar, settings.seed).fill(rng.choice(grammar.templates), rng)
        if normalized(caption) not in excluded:
            captions.append(caption)
    pixels, _ = draw_batch(captions, rng)
    negatives = []
    for caption in captions:
        scene = try_parse_caption(caption)
        assert scene is not None  # the grammars write only shapes-world captions
        negatives.append([_allowed_negative(scene, kind, rng, excluded) for kind in NEGATIVE_KINDS])
    return captions, pixels, negatives


def _allowed_negative(scene: Scene, kind: str, rng: random.Random, excluded: set[str]) -> str:
    """A hard negative of ``kind`` that is not an excluded prompt (else another shape changed)."""

    text = scene_caption(hard_negative(scene, kind, rng))
    for _ in range(200):
        if normalized(text) not in excluded:
            return text
        text = scene_caption(hard_negative(scene, rng.choice(NEGATIVE_KINDS), rng))
    raise TrainingError(f"{scene_caption(scene)!r}: every hard negative tried is an excluded prompt")


def degrade(pixels, settings: JudgeSettings, generator):
    """Renders made a little like a diffusion model's: per image a pixel-noise std in [0, noise]
    and, with probability ``blur``, a 3x3 box blur."""
    import torch

    n = pixels.shape[0]
    blurred = torch.nn.functional.avg_pool2d(pixels, 3, stride=1, padding=1, count_include_pad=False)
    chosen = (torch.rand(n, generator=generator) < settings.blur).view(n, 1, 1, 1)
    pixels = torch.where(chosen, blurred, pixels)
    std = torch.rand(n, generator=generator).view(n, 1, 1, 1) * settings.noise
    return (pixels + std * torch.randn(pixels.shape, generator=generator)).clamp(-1, 1)


# ------------------------------------------------------------------------------------ the model


def build_judge():
    """An untrained judge (CLIPModel, 32 px images in 4 px patches) and its processor (the
    explicit toy tokenizer, a PIL image processor mapping pixels to [-1, 1])."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = toy_tokenizer()
    vocab = len(tokenizer)
    text = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        hidden_act="quick_gelu",
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )
    vision = dict(
        image_size=IMAGE_SIZE,
        patch_size=4,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        hidden_act="quick_gelu",
    )
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))
    # The PIL image processor: the default one needs torchvision, which this project does not install.
    size = IMAGE_SIZE
    images = CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )
    return model, CLIPProcessor(image_processor=images, tokenizer=tokenizer)


def contrastive_loss(model, input_ids, pixels, captions: list[str], negatives: list[list[str]]):
    """CLIP's symmetric loss with hard negatives: each image against every caption and negative of
    the batch (texts equal to its own caption masked out, as they are true of it), each caption
    against every image."""
    import torch

    n = len(captions)
    texts = captions + [text for row in negatives for text in row]
    image = torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    text = torch.nn.functional.normalize(model.get_text_features(input_ids=input_ids).pooler_output, dim=-1)
    logits = model.logit_scale.exp() * image @ text.T  # [n, n (1 + K)]
    keys = [normalized(t) for t in texts]
    same = torch.tensor([[keys[j] == keys[i] and j != i for j in range(len(texts))] for i in range(n)])
    image_loss = torch.nn.functional.cross_entropy(logits.masked_fill(same, float("-inf")), torch.arange(n))
    text_logits = logits[:, :n].T.masked_fill(same[:, :n].T, float("-inf"))
    text_loss = torch.nn.functional.cross_entropy(text_logits, torch.arange(n))
    return (image_loss + text_loss) / 2


def _tokens(tokenizer, texts: list[str]):
    return tokenizer(
        texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


# ------------------------------------------------------------------------------------ training


def excluded_prompts(recipe: str | None, folder: Path) -> set[str]:
    """The held-out and development prompts (normalized) of a study recipe, written under ``folder``."""

    if recipe is None:
        return set()
    run = load_run_recipe(recipe)
    paths = RunPaths(folder)
    excluded = set()
    for skill in run.skills:
        generate_prompts(skill, paths.prompts(skill.name), run.evaluate.prompts_per_skill)
        excluded |= {normalized(r.prompt) for r in read_prompts(paths.prompts(skill.name), split="heldout")}
    for records in dev_prompts(run, paths, folder / "dev-prompts").values():
        excluded |= {normalized(r.prompt) for r in records}
    return excluded


def _load_state(out: Path, settings: JudgeSettings) -> dict[str, Any] | None:
    path = out / "checkpoint" / STATE_FILE
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    changed = {
        k: (record["settings"].get(k), v)
        for k, v in settings.model_dump().items()
        if k not in RESUMABLE and record["settings"].get(k) != v
    }
    if changed:
        shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise TrainingError(
            what=f"holds a judge training run with other settings ({shown})",
            where=str(out),
            remedies=[Remedy.do("resume with the same settings"), Remedy.change("out", "folder")],
        )
    if record["step"] > settings.steps:
        raise TrainingError(
            what=f"already trained {record['step']} steps, more than asked",
            where=(str(out), Option("steps")),
            found=settings.steps,
            remedies=[Remedy.do(f"export it with judge-export {out}")],
        )
    return record


def train_judge(
    out: str | Path, settings: JudgeSettings, *, progress: Callable[[int, int, float], None] | None = None
) -> Path:
    """Train (or resume) the judge in ``out``; return the checkpoint folder (export it with export_judge)."""
    import torch
    from safetensors.torch import load_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    record = _load_state(out, settings)
    excluded = excluded_prompts(settings.exclude_recipe, out / "excluded")
    grammars = caption_sources()
    torch.manual_seed(settings.seed)
    model, processor = build_judge()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (settings.warmup_steps + 1)))
    start = 0
    if record is not None:
        model.load_state_dict(load_file(str(out / "checkpoint" / "model.safetensors")))
        restore_optimizer(optimizer, load_file(str(out / "checkpoint" / "optimizer.safetensors")), record["optimizer"])
        schedule.load_state_dict(record["schedule"])
        start = record["step"]
        log.info("judge: resuming at step %d", start)
    model.train()
    with JsonlAppender(out / "log.jsonl") as logger:
        for step in range(start, settings.steps):
            captions, pixels, negatives = step_examples(grammars, settings, step, excluded)
            pixels = degrade(pixels, settings, step_generator(settings.seed, "judge", step))
            texts = captions + [text for row in negatives for text in row]
            loss = contrastive_loss(model, _tokens(processor.tokenizer, texts), pixels, captions, negatives)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            logger.append({"step": done, "loss": round(loss.item(), 6)})
            if progress:
                progress(done, settings.steps, loss.item())
            if done % settings.checkpoint_every == 0 or done == settings.steps:
                tensors, extra = flatten_optimizer(optimizer)
                save_checkpoint(
                    out,
                    {
                        "step": done,
                        "settings": settings.model_dump(),
                        "optimizer": extra,
                        "schedule": schedule.state_dict(),
                        "threads": torch.get_num_threads(),
                        "excluded_prompts": len(excluded),
                    },
                    {"model": model.state_dict(), "optimizer": tensors},
                )
    return out / "checkpoint"


def negative_accuracy(
    model, processor, settings: JudgeSettings, excluded: set[str], batches: int = 4
) -> dict[str, float]:
    """On fresh clean renders (another seed, the study's prompts still excluded): the share of images
    whose caption the judge scores above its hard negative, per negative kind."""
    import torch

    check = JudgeSettings(**{**settings.model_dump(), "seed": settings.seed + 10_000})
    wins = {kind: [] for kind in NEGATIVE_KINDS}
    model.eval()
    with torch.no_grad():
        for step in range(batches):
            captions, pixels, negatives = step_examples(caption_sources(), check, step, excluded)
            texts = captions + [text for row in negatives for text in row]
            image = torch.nn.functional.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
            text = torch.nn.functional.normalize(
                model.get_text_features(input_ids=_tokens(processor.tokenizer, texts)).pooler_output, dim=-1
            )
            n = len(captions)
            positive = (image * text[:n]).sum(-1)
            for k, kind in enumerate(NEGATIVE_KINDS):
                negative = (image * text[n + torch.arange(n) * len(NEGATIVE_KINDS) + k]).sum(-1)
                wins[kind] += (positive > negative).tolist()
    return {kind: round(sum(v) / len(v), 4) for kind, v in wins.items()}


def export_judge(out: str | Path, target: str | Path = JUDGE_DIR) -> Path:
    """Write the trained judge (fp16 safetensors), its processor and ``toyworld-judge.json``
    (settings, checks, rebuild commands) to ``target``, replacing it whole."""
    import torch
    from safetensors.torch import load_file

    out, target = Path(out), Path(target)
    state = out / "checkpoint" / STATE_FILE
    if not state.is_file():
        raise TrainingError(f"{out}: no judge checkpoint; run `selma toyworld judge-train --out {out}` first")
    record = json.loads(state.read_text())
    settings = JudgeSettings(**record["settings"])
    model, processor = build_judge()
    model.load_state_dict(load_file(str(out / "checkpoint" / "model.safetensors")))
    checks = negative_accuracy(model, processor, settings, excluded_prompts(settings.exclude_recipe, out / "excluded"))
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.to(torch.float16).save_pretrained(partial, safe_serialization=True)
    processor.save_pretrained(partial)
    options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.model_dump().items() if v is not None)
    provenance = {
        "step": record["step"],
        "settings": settings.model_dump(),
        "threads": record.get("threads"),
        "excluded_prompts": record.get("excluded_prompts"),
        "caption_beats_hard_negative": checks,
        "rebuild": [
            f"selma toyworld judge-train --out OUT {options} --threads {record.get('threads')}",
            f"selma toyworld judge-export OUT --to {target.name}",
        ],
    }
    atomic_write_text(partial / RECORD_FILE, json.dumps(provenance, indent=1) + "\n")
    for path in partial.rglob("*"):
        if path.is_file():
            path.chmod(0o644)
    if target.exists():
        shutil.rmtree(target)
    partial.rename(target)
    return target


def judge_dir() -> Path:
    """The shipped ``toy:judge`` folder; ValueError when its weights are missing."""
    if not (JUDGE_DIR / "model.safetensors").is_file():
        raise ValueError(
            f"{JUDGE_SPEC}: the shapes-world judge is missing from {JUDGE_DIR}; rebuild it with "
            f"`selma toyworld judge-train --out DIR` and `selma toyworld judge-export DIR`, or reinstall "
            "selma-toolkit"
        )
    return JUDGE_DIR
