"""Best-of-N images (DreamSync's recipe): N candidates per prompt, the judge's best one kept.

With ``[images] candidates = N`` and ``judge = "<scorer>"`` the image stage draws, for each batch
of prompts, candidate k = 0 .. N-1 of every prompt (candidate 0 from the seed a plain run uses,
so N = 1 is the plain stage), scores every candidate against its prompt with the judge, and keeps
the highest-scoring one (ties to the lower k; a candidate the judge cannot score, or that the
safety checker blacked out, is never preferred to one it can). The judge is a scorer of the
registry (evaluate/scorers.py) built from the images section's own settings (``judge_model``,
``judge_batch_size``), not from [evaluate], so the judge of the training data and the metric of
the evaluation are chosen separately; it is loaded once per process and reused by every call.

Every candidate's seed and score are written beside the kept image (``<id>.judge.json``, before
the caption that marks the example done) and copied into its ``metadata.jsonl`` row.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selma_toolkit.config.registries import SCORER_MODEL_FIELDS
from selma_toolkit.evaluate.scorers import build_scorer
from selma_toolkit.images.naming import candidate_seed
from selma_toolkit.io import atomic_write_text

if TYPE_CHECKING:
    from selma_toolkit.config.evaluate import EvaluateSettings
    from selma_toolkit.config.images import ImageSettings
    from selma_toolkit.evaluate.scorers import Scorer

log = logging.getLogger(__name__)


def judge_settings(images: ImageSettings) -> EvaluateSettings:
    """The judge's scorer settings: the registry's defaults with the images section's judge model
    and batch size (nothing is read from [evaluate])."""
    from selma_toolkit.config.evaluate import EvaluateSettings

    fields: dict[str, Any] = {"scorers": [images.judge], "batch_size": images.judge_batch_size}
    if images.judge_model is not None:
        fields[SCORER_MODEL_FIELDS[images.judge]] = images.judge_model
    return EvaluateSettings(**fields)


@functools.lru_cache(maxsize=4)
def _cached_judge(settings_json: str, device: str | None) -> Scorer:
    from selma_toolkit.config.evaluate import EvaluateSettings

    settings = EvaluateSettings.model_validate_json(settings_json)
    return build_scorer(settings.scorers[0], settings, device)


def load_judge(images: ImageSettings, device: str | None = None) -> Scorer:
    """The judge of ``images`` (``images.judge`` with its model), built once per process and
    settings: later calls (other skills, other stages such as DPO's pairs) reuse its loaded model."""
    if images.judge is None:
        raise ValueError("images.judge is not set")
    return _cached_judge(judge_settings(images).model_dump_json(), device)


def judge_label(images: ImageSettings) -> str:
    """``clipscore(toy:judge)``: the judge and its model, as recorded with the images."""
    return f"{images.judge}({images.judge_model})" if images.judge_model else str(images.judge)


def choose(scores: Sequence[float | None]) -> int:
    """Index of the highest score; ties go to the first; scores of None are never chosen over a number."""
    best = 0
    for index, value in enumerate(scores):
        if value is not None and (scores[best] is None or value > scores[best]):
            best = index
    return best


def draw_best(pipe, batch: Sequence[Any], run, judge: Scorer, draw) -> tuple[list[Any], list[bool], list[dict]]:
    """Best of ``images.candidates`` for each prompt of ``batch``: (kept images, blacked out, records).

    ``draw(pipe, batch, run, seeds)`` draws one image per prompt from the given seeds (the stage's
    own pipeline call); a record is ``{"judge", "chosen", "candidates": [{"seed", "score"}, ...]}``.
    """
    settings = run.images
    prompts = [p.prompt for p in batch]
    drawn, flags, seeds, scores = [], [], [], []
    for k in range(settings.candidates):
        candidate_seeds = [candidate_seed(settings.seed, p.id, k) for p in batch]
        images, flagged = draw(pipe, batch, run, candidate_seeds)
        values = judge.score(images, prompts)
        drawn.append(images)
        flags.append(flagged)
        seeds.append(candidate_seeds)
        scores.append([None if f else (None if v is None else float(v)) for v, f in zip(values, flagged)])
    kept, blacked, records = [], [], []
    for i in range(len(batch)):
        column = [scores[k][i] for k in range(settings.candidates)]
        chosen = choose(column)
        kept.append(drawn[chosen][i])
        blacked.append(all(flags[k][i] for k in range(settings.candidates)))
        records.append(
            {
                "judge": judge_label(settings),
                "chosen": chosen,
                "candidates": [{"seed": seeds[k][i], "score": column[k]} for k in range(settings.candidates)],
            }
        )
    return kept, blacked, records


def record_path(folder: Path, name: str) -> Path:
    """``<id>.judge.json`` beside the kept image ``<id>.png``."""
    return folder / f"{Path(name).stem}.judge.json"


def write_record(folder: Path, name: str, record: dict) -> None:
    atomic_write_text(record_path(folder, name), json.dumps(record) + "\n")


def read_record(folder: Path, name: str) -> dict | None:
    """The candidates' record of a kept image, or None (a plain run, or a kill before it was written)."""
    path = record_path(folder, name)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
