"""The study's training datasets and prompt sets (selma_toolkit.toyworld.study): ground-truth
renders, best-of-K filtered copies of self-generated images, the development prompt stream, and
how faithful a dataset's images are (its mean toyworld score)."""

from __future__ import annotations

import io
import json
import logging
import random
from pathlib import Path

from selma_toolkit.config.recipes import RunRecipe
from selma_toolkit.dataset import (
    METADATA,
    PromptRecord,
    read_image_dataset,
    read_prompts,
)
from selma_toolkit.errors import RecipeError
from selma_toolkit.images import image_name, image_seed
from selma_toolkit.io import atomic_write_bytes, atomic_write_text, read_jsonl
from selma_toolkit.paths import RunPaths
from selma_toolkit.prompts.filters import normalized
from selma_toolkit.prompts.grammar import GrammarSource
from selma_toolkit.toyworld.renderer import render_caption
from selma_toolkit.toyworld.scorer import key_questions_pass, score_image

log = logging.getLogger(__name__)


def write_dataset(folder: Path, examples: list[tuple[int, str, str, object]], extra: dict[str, object]) -> None:
    """An imagefolder dataset: ``examples`` of (prompt id, skill, caption, PIL image or source path)."""
    rows = []
    for prompt_id, skill, caption, image in examples:
        name = image_name(prompt_id)
        if isinstance(image, Path):
            data = image.read_bytes()
        else:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data = buffer.getvalue()
        atomic_write_bytes(folder / name, data)
        atomic_write_text(folder / image_name(prompt_id, "txt"), caption)
        rows.append(
            json.dumps({"file_name": name, "text": caption, "prompt_id": prompt_id, "skill": skill, **extra}) + "\n"
        )
    # metadata.jsonl last: its presence marks the dataset complete.
    atomic_write_text(folder / METADATA, "".join(rows))


def write_ground_truth(run: RunRecipe, skill: str, paths: RunPaths) -> int:
    """Ground-truth renders of ``skill``'s train prompts into ``paths.images(skill)``; each
    placement drawn from ``image_seed(images.seed, prompt id)``. Returns the number of images."""

    folder = paths.images(skill)
    prompts = sorted(read_prompts(paths.prompts(skill), split="train"), key=lambda p: p.id)
    if not (folder / METADATA).is_file():
        seed = run.images.seed
        examples = [
            (p.id, skill, p.prompt, render_caption(p.prompt, random.Random(image_seed(seed, p.id)))) for p in prompts
        ]
        write_dataset(folder, examples, {"source": "ground-truth render", "seed": seed})
    return len(prompts)


def write_filtered(
    sources: list[RunPaths], skill: str, paths: RunPaths, min_score: float, key_question: str | None = None
) -> tuple[int, int]:
    """Best-of-K filtering: for each train prompt of ``skill``, the first of its self-generated
    candidates (one per run folder in ``sources``, in order) that passes, copied into
    ``paths.images(skill)``: its toyworld score is at least ``min_score``, or, with
    ``key_question`` (a scorer question kind such as "count"), its questions of that kind are
    right. Returns (prompts kept, prompts); when none passes, nothing is written but the record
    (that expert is left out of the replicate, with a warning, rather than stopping the study)."""
    from PIL import Image

    def passes(image, caption: str) -> bool:
        if key_question is not None:
            return bool(key_questions_pass(image, caption, key_question))
        score = score_image(image, caption)
        return score is not None and score >= min_score

    candidates = [
        {int(r.extra["prompt_id"]): r for r in read_image_dataset(source.images(skill))} for source in sources
    ]
    folder = paths.images(skill)
    record_path = folder / ".selma-filter.json"
    wanted = {"min_score": min_score, "candidates": len(sources), "key_question": key_question}
    if record_path.is_file():
        done = json.loads(record_path.read_text())
        if all(done.get(key) == value for key, value in wanted.items()):
            return done["kept"], done["total"]
    kept = []
    for prompt_id, _first in sorted(candidates[0].items()):
        for records in candidates:
            record = records.get(prompt_id)
            if record is None:
                continue
            with Image.open(record.path) as image:
                if passes(image.convert("RGB"), record.text):
                    kept.append((prompt_id, skill, record.text, record.path))
                    break
    total = len(candidates[0])
    rule = f"its {key_question} questions right" if key_question else f"scoring {min_score} or more"
    folder.mkdir(parents=True, exist_ok=True)
    if kept:
        write_dataset(folder, kept, {"source": f"self-generated, best of {len(sources)}, {rule}"})
    else:
        log.warning(
            "%s: none of the %d prompts has a self-generated image (of %d per prompt) with %s: no expert is "
            "trained on this data (lower --filter-min-score or raise --filter-candidates)",
            sources[0].images(skill),
            total,
            len(sources),
            rule,
        )
    atomic_write_text(record_path, json.dumps({**wanted, "kept": len(kept), "total": total}) + "\n")
    return len(kept), total


def copy_prompts(source: RunPaths, target: RunPaths, skill: str) -> None:
    if not target.prompts(skill).is_file():
        atomic_write_bytes(target.prompts(skill), source.prompts(skill).read_bytes())


def image_scores(folder: Path) -> dict[int, float]:
    """The toyworld score of every image of a dataset on its own caption, by prompt id."""
    from PIL import Image

    scores = {}
    for record in read_image_dataset(folder):
        with Image.open(record.path) as image:
            scores[int(record.extra["prompt_id"])] = score_image(image.convert("RGB"), record.text) or 0.0
    return scores


def mean_score(scores: dict[int, float]) -> float:
    """The mean of image_scores (how faithful a dataset's images are), rounded to 0.01."""
    return round(sum(scores.values()) / max(1, len(scores)), 2)


# ------------------------------------------------------------------------------ the development stream

# The development prompts: the skill's grammar with seed ``skill.seed + DEV_SEED_OFFSET``, ids from
# DEV_ID_START (so their image seeds are none of the train or held-out prompts').
DEV_SEED_OFFSET = 7_000_003
DEV_ID_START = 1_000_000
DEV_SPLIT = "dev"


def dev_prompts(run: RunRecipe, paths: RunPaths, folder: Path) -> dict[str, list[PromptRecord]]:
    """``evaluate.prompts_per_skill`` development prompts per skill: a prompt set that is neither
    trained on nor held out, for sizing a study (its budgets, its positive control) before the
    held-out prompts are looked at. Drawn from each skill's grammar with another seed, every prompt
    that is also in the skill's prompt file (train or held-out, ``paths.prompts``) or already drawn
    left out; written to ``folder/<skill>.jsonl`` (split ``dev``) and read back from there."""

    wanted = run.evaluate.prompts_per_skill
    chosen: dict[str, list[PromptRecord]] = {}
    for skill in run.skills:
        path = folder / f"{skill.name}.jsonl"
        taken = {normalized(r.prompt) for r in read_prompts(paths.prompts(skill.name))}
        if path.is_file():
            rows = read_jsonl(path)
            if len(rows) == wanted and not any(normalized(row["prompt"]) in taken for row in rows):
                chosen[skill.name] = read_prompts(path)
                continue
        if skill.grammar is None:
            raise RecipeError(f"skill {skill.name!r}: the development prompt stream needs a grammar source")
        source = GrammarSource(skill.grammar, skill.seed + DEV_SEED_OFFSET)
        records: list[PromptRecord] = []
        for index in range(10_000):  # a bounded search: a grammar with too few prompts left is an error below
            for text in source.batch(index, 64):
                key = normalized(text)
                if key not in taken and len(records) < wanted:
                    taken.add(key)
                    records.append(PromptRecord(DEV_ID_START + len(records), skill.name, text, DEV_SPLIT))
            if len(records) == wanted:
                break
        else:
            raise RecipeError(
                f"skill {skill.name!r}: its grammar has fewer than {wanted} prompts beyond the train and "
                "held-out prompts; lower evaluate.prompts_per_skill or num_prompts"
            )
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(
            path,
            "".join(
                json.dumps({"id": r.id, "skill": r.skill, "prompt": r.prompt, "split": r.split}) + "\n" for r in records
            ),
        )
        chosen[skill.name] = records
    return chosen


# ------------------------------------------------------------------------------ the judge against the scorer


def roc_auc(scores: list[float], positive: list[bool]) -> float | None:
    """ROC AUC of ``scores`` for the ``positive`` labels: the chance that a random positive scores
    above a random negative (ties count half), from average ranks (the Mann-Whitney U statistic;
    written here because scikit-learn and scipy are not dependencies). None without both classes."""
    import numpy as np

    values = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = values.argsort(kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):  # average ranks of ties
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def judge_agreement(folder: Path, judge) -> dict[str, object]:
    """How well ``judge`` (a scorer) tells the images of a dataset that answer every question right
    (exact toyworld score 100) from the others: its ROC AUC, with the counts; the per-image judge
    and exact scores are kept so that seeds can be pooled."""
    from PIL import Image

    images, captions, exact = [], [], []
    for record in read_image_dataset(folder):
        with Image.open(record.path) as image:
            images.append(image.convert("RGB"))
        captions.append(record.text)
        exact.append(score_image(images[-1], record.text) or 0.0)
    judged = [float(v) if v is not None else float("-inf") for v in judge.score(images, captions)]
    right = [value == 100.0 for value in exact]
    return {
        "auc": roc_auc(judged, right),
        "images": len(images),
        "all_right": sum(right),
        "judge_scores": [round(v, 4) for v in judged],
        "exact_scores": exact,
    }
