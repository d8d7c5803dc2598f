"""Score every variant's evaluation images and write scores.json, scores.csv and summary.csv.

Part of ``selma evaluate``: the caller generates images for each variant (``base``,
``expert:<skill>``, ``joint``, ``merged:<method>``) and skill with fixed seeds, and hands them over as
``{variant: {skill: [EvalItem, ...]}}``; this module scores them with every scorer and aggregates.

Resumable: each (image, scorer) score is appended to ``item_scores.jsonl`` as it is computed, keyed
by variant, skill, index, seed, prompt, the image's sha256 and the scorer's model; a rerun scores
only what is missing (a regenerated image has a new sha256 and is scored again).

scores.json::

    {"format": "selma-scores/1", "variants": [...], "skills": [...],
     "scorers": {"clipscore": {"label", "model", "description"}, ...},
     "aggregate": {variant: {"overall": {metric: {"mean", "low", "high", "n"}},
                             "skills": {skill: {metric: {...}}}}},
     "items": [{"variant", "skill", "index", "prompt_id", "prompt", "seed", "image", "scores": {metric: x|null}}]}

``image`` is relative to the folder of scores.json when the image lies inside it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selma_toolkit.errors import DatasetError
from selma_toolkit.evaluate.stats import bootstrap_interval, finite
from selma_toolkit.io import (
    JsonlAppender,
    atomic_open,
    atomic_write_text,
    read_json,
    read_jsonl,
    sha256_file,
)

if TYPE_CHECKING:
    from PIL.Image import Image

    from selma_toolkit.evaluate.scorers import Scorer

logger = logging.getLogger(__name__)

SCORES_FORMAT = "selma-scores/1"
SCORES_JSON, SCORES_CSV, SUMMARY_CSV, ITEM_SCORES = "scores.json", "scores.csv", "summary.csv", "item_scores.jsonl"
_VARIANT_RANK = {"base": 0, "expert": 1, "joint": 2, "merged": 3}


@dataclass(frozen=True)
class EvalItem:
    """One evaluation image: a file (or a PIL image, saved under ``images/``), its prompt and seed."""

    image: Path | str | Image
    prompt: str
    seed: int = 0
    prompt_id: int | str | None = None


def variant_sort_key(variant: str) -> tuple[int, str]:
    """Report order: base, experts, joint, merged LoRAs, anything else; by name within a kind."""
    return _VARIANT_RANK.get(variant.split(":", 1)[0], len(_VARIANT_RANK)), variant


def variant_folder(variant: str) -> str:
    """``merged:selma`` -> ``merged-selma`` (a folder name)."""
    return variant.replace(":", "-").replace("/", "-")


def _materialise(item: EvalItem, out_dir: Path, variant: str, skill: str, index: int) -> Path:
    if isinstance(item.image, (str, Path)):
        path = Path(item.image)
        if not path.is_file():
            raise DatasetError(f"{path}: evaluation image of {variant} / {skill} #{index} not found")
        return path
    path = out_dir / "images" / variant_folder(variant) / skill / f"{index:04d}-seed{item.seed}.png"
    buffer = io.BytesIO()
    item.image.save(buffer, format="PNG")
    if not path.is_file() or path.read_bytes() != buffer.getvalue():
        with atomic_open(path) as handle:
            handle.write(buffer.getvalue())
    return path


def _record_key(record: Mapping[str, Any]) -> tuple:
    return (
        record["variant"],
        record["skill"],
        record["index"],
        record["seed"],
        record["prompt"],
        record["image_sha256"],
        record["scorer"],
        record["model"],
    )


def score_variants(
    variants: Mapping[str, Mapping[str, Sequence[EvalItem]]],
    scorers: Sequence[Scorer],
    out_dir: str | Path,
    *,
    bootstrap_samples: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
) -> dict[str, Any]:
    """Score ``{variant: {skill: [EvalItem]}}`` with every scorer; write scores.json, scores.csv and
    summary.csv into ``out_dir`` (atomically) and return the scores.json document."""
    from PIL import Image

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not variants or not scorers:
        raise DatasetError("score_variants: nothing to score (no variants or no scorers)")
    rows: list[dict[str, Any]] = []
    for variant in sorted(variants, key=variant_sort_key):
        for skill, items in variants[variant].items():
            for index, item in enumerate(items):
                path = _materialise(item, out_dir, variant, skill, index)
                rows.append(
                    {
                        "variant": variant,
                        "skill": skill,
                        "index": index,
                        "prompt_id": item.prompt_id,
                        "prompt": item.prompt,
                        "seed": item.seed,
                        "path": path,
                        "image_sha256": sha256_file(path),
                    }
                )
    cache_path = out_dir / ITEM_SCORES
    cached = (
        {_record_key(r): r["score"] for r in read_jsonl(cache_path, repair_tail=True)} if cache_path.exists() else {}
    )
    with JsonlAppender(cache_path) as appender:
        for scorer in scorers:
            todo = [row for row in rows if _key(row, scorer) not in cached]
            logger.info(
                "%s: %d of %d images to score (%d done earlier)",
                scorer.name,
                len(todo),
                len(rows),
                len(rows) - len(todo),
            )
            for start in range(0, len(todo), batch_size):
                batch = todo[start : start + batch_size]
                images = []
                for row in batch:
                    with Image.open(row["path"]) as opened:
                        images.append(opened.convert("RGB"))
                values = _score(scorer, images, batch)
                if len(values) != len(batch):
                    raise ValueError(f"scorer {scorer.name!r} returned {len(values)} scores for {len(batch)} images")
                for row, value in zip(batch, values):
                    # JSON has no NaN: a score that is not a finite number is stored as "not applicable".
                    value = float(value) if value is not None and math.isfinite(value) else None
                    record = {**_key_fields(row), "scorer": scorer.name, "model": _model_key(scorer), "score": value}
                    appender.append(record)
                    cached[_record_key(record)] = value
    document = _document(rows, scorers, cached, out_dir, bootstrap_samples, seed)
    atomic_write_text(out_dir / SCORES_JSON, json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    _write_csvs(document, out_dir)
    return document


def _score(scorer: Scorer, images: list[Any], batch: list[dict[str, Any]]) -> list[float | None]:
    """``scorer.score`` on a batch; a scorer that tells images apart by prompt id (``score_by_id``: a
    benchmark whose prompt texts are not unique) gets the ids instead."""
    by_id = getattr(scorer, "score_by_id", None)
    if by_id is not None:
        return by_id(images, [row["prompt_id"] for row in batch])
    return scorer.score(images, [row["prompt"] for row in batch])


def _key_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    return {k: row[k] for k in ("variant", "skill", "index", "seed", "prompt", "image_sha256")}


def _model_key(scorer: Scorer) -> str:
    """What a cached score depends on besides the image: the model, and e.g. the question set."""
    return getattr(scorer, "cache_key", scorer.model_id)


def _key(row: Mapping[str, Any], scorer: Scorer) -> tuple:
    return _record_key({**_key_fields(row), "scorer": scorer.name, "model": _model_key(scorer)})


def _stats(values: list[float | None], samples: int, seed: int) -> dict[str, float | int] | None:
    numbers = finite(values)
    return bootstrap_interval(numbers, samples=samples, seed=seed).as_dict() if numbers else None


def _document(rows, scorers, cached, out_dir: Path, samples: int, seed: int) -> dict[str, Any]:
    items = []
    for row in rows:
        path = Path(row["path"])
        try:
            image = path.resolve().relative_to(out_dir.resolve()).as_posix()
        except ValueError:
            image = str(path.resolve())
        scores = {scorer.name: cached[_key(row, scorer)] for scorer in scorers}
        items.append(
            {k: row[k] for k in ("variant", "skill", "index", "prompt_id", "prompt", "seed")}
            | {"image": image, "scores": scores}
        )
    variants = list(dict.fromkeys(item["variant"] for item in items))
    skills = list(dict.fromkeys(item["skill"] for item in items))
    aggregate: dict[str, Any] = {}
    for variant in variants:
        mine = [item for item in items if item["variant"] == variant]
        aggregate[variant] = {
            "overall": {s.name: _stats([i["scores"][s.name] for i in mine], samples, seed) for s in scorers},
            "skills": {
                skill: {
                    s.name: _stats([i["scores"][s.name] for i in mine if i["skill"] == skill], samples, seed)
                    for s in scorers
                }
                for skill in skills
                if any(i["skill"] == skill for i in mine)
            },
        }
    return {
        "format": SCORES_FORMAT,
        "variants": variants,
        "skills": skills,
        "scorers": {s.name: {"label": s.label, "model": s.model_id, "description": s.description} for s in scorers},
        "bootstrap": {"samples": samples, "confidence": 0.95, "seed": seed},
        "aggregate": aggregate,
        "items": items,
    }


def _csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _write_csvs(document: Mapping[str, Any], out_dir: Path) -> None:
    metrics = list(document["scorers"])
    per_item = [
        [
            i["variant"],
            i["skill"],
            i["index"],
            i["prompt_id"],
            i["seed"],
            i["prompt"],
            i["image"],
            *[i["scores"][m] for m in metrics],
        ]
        for i in document["items"]
    ]
    atomic_write_text(
        out_dir / SCORES_CSV,
        _csv_text(["variant", "skill", "index", "prompt_id", "seed", "prompt", "image", *metrics], per_item),
    )
    summary = []
    for variant, parts in document["aggregate"].items():
        for skill, stats in [("(all)", parts["overall"]), *parts["skills"].items()]:
            for metric in metrics:
                if stats[metric] is not None:
                    s = stats[metric]
                    summary.append([variant, skill, metric, s["n"], s["mean"], s["low"], s["high"]])
    atomic_write_text(
        out_dir / SUMMARY_CSV, _csv_text(["variant", "skill", "metric", "n", "mean", "ci_low", "ci_high"], summary)
    )


def read_scores(path: str | Path) -> dict[str, Any]:
    """Read scores.json (or the folder holding it); errors name the file and what is wrong."""
    path = Path(path)
    if path.is_dir():
        path = path / SCORES_JSON
    document = read_json(path, missing="no scores file; run `selma evaluate` first")
    if not isinstance(document, dict) or document.get("format") != SCORES_FORMAT:
        found = document.get("format") if isinstance(document, dict) else type(document).__name__
        raise DatasetError(f"{path}: expected a scores file of format {SCORES_FORMAT!r}, found {found!r}")
    return document
