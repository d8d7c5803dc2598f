"""Checkpoint selection, as in the paper: score the expert of every saved checkpoint of each skill
on that skill's held-out prompts (never its training prompts) and record the best.

``selma evaluate RUN --checkpoints`` calls :func:`select_checkpoints`; ``selma run`` does too when
``evaluate.select_checkpoints`` is set, and then merges the chosen checkpoints
(:func:`selected_expert`) unless told to take the final experts.

Files under ``eval/checkpoints/``::

    <skill>/images/checkpoint-step-N/...   evaluation images of each checkpoint (generate.py layout)
    <skill>/scores.json, scores.csv, ...   their scores (score_variants)
    selection.json                         per skill: metric, every checkpoint's mean, the best step

A selection is *current* while the checkpoints (step and sha256 of each expert file), the held-out
prompts, seeds, scorer and generation settings are those it was made from; otherwise it is redone.
The best checkpoint is the one with the highest mean of ``evaluate.selection_metric`` (default: the
first scorer); on a tie, the later step.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selma_toolkit.config.evaluate import EvaluateSettings
from selma_toolkit.config.recipes import RunRecipe
from selma_toolkit.errors import DatasetError, Remedy, TrainingError
from selma_toolkit.evaluate.generate import (
    EvalJob,
    ProgressCallback,
    draw_eval_images,
    generation_settings,
    heldout_prompts,
)
from selma_toolkit.evaluate.scorers import build_scorer
from selma_toolkit.evaluate.scoring import score_variants, variant_folder
from selma_toolkit.io import atomic_write_text, sha256_file
from selma_toolkit.paths import RunPaths

log = logging.getLogger(__name__)

SELECTION_FORMAT = "selma-checkpoint-selection/1"


@dataclass(frozen=True)
class CheckpointChoice:
    """The best checkpoint of one skill, and every checkpoint's mean score."""

    skill: str
    metric: str
    step: int
    expert: Path
    sha256: str
    means: dict[int, float | None]


def selection_folder(paths: RunPaths) -> Path:
    """``eval/checkpoints/`` of the run folder."""
    return paths.eval_dir / "checkpoints"


def selection_metric(settings: EvaluateSettings) -> str:
    """The scorer that picks the best checkpoint: evaluate.selection_metric, else the first scorer."""
    return settings.selection_metric or settings.scorers[0]


def _checkpoint_files(paths: RunPaths, skill: str) -> list[tuple[int, Path]]:
    # selma_toolkit.train imports torch: only here, when checkpoints are looked at.
    from selma_toolkit.train import checkpoint_experts

    return checkpoint_experts(paths.train_dir(skill))


def _signature(run: RunRecipe, checkpoints: Sequence[tuple[int, Path]], prompts) -> dict[str, Any]:
    metric = selection_metric(run.evaluate)
    scorer = build_scorer(metric, run.evaluate)
    return {
        "checkpoints": [[step, sha256_file(path)] for step, path in checkpoints],
        "prompts": [[p.id, p.prompt] for p in prompts],
        "seeds": list(run.evaluate.seeds),
        "metric": metric,
        "scorer": getattr(scorer, "cache_key", scorer.model_id),
        "settings": generation_settings(run),
    }


def read_selection(paths: RunPaths) -> dict[str, Any]:
    """The ``skills`` table of selection.json (empty when no selection was made)."""
    path = paths.selection
    if not path.is_file():
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(
            what=f"not valid JSON ({exc.msg})",
            where=str(path),
            remedies=[Remedy.do("delete it"), Remedy.run("selma evaluate RUN --checkpoints", note="after deleting it")],
        ) from None
    if document.get("format") != SELECTION_FORMAT:
        raise DatasetError(f"{path}: expected format {SELECTION_FORMAT!r}, found {document.get('format')!r}")
    return document["skills"]


def _choice(paths: RunPaths, skill: str, entry: dict[str, Any]) -> CheckpointChoice:
    return CheckpointChoice(
        skill=skill,
        metric=entry["metric"],
        step=entry["best_step"],
        expert=paths.root / entry["expert"],
        sha256=entry["sha256"],
        means={c["step"]: c["mean"] for c in entry["checkpoints"]},
    )


def current_selection(run: RunRecipe, paths: RunPaths, skill: str) -> CheckpointChoice | None:
    """The recorded choice for ``skill`` if it is current (see the module docstring), else None."""
    entry = read_selection(paths).get(skill)
    if entry is None:
        return None
    try:
        prompts = heldout_prompts(run, paths)[skill]
    except DatasetError:
        return None
    if entry.get("signature") != _signature(run, _checkpoint_files(paths, skill), prompts):
        return None
    return _choice(paths, skill, entry)


def selected_expert(run: RunRecipe, paths: RunPaths, skill: str) -> Path:
    """The expert file to use for ``skill``: the best checkpoint when a current selection exists,
    else the final expert (``experts/<skill>.safetensors``)."""
    choice = current_selection(run, paths, skill)
    return choice.expert if choice is not None else paths.expert(skill)


def select_checkpoints(
    run: RunRecipe,
    paths: RunPaths,
    skills: Sequence[str] | None = None,
    *,
    progress: ProgressCallback | None = None,
) -> dict[str, CheckpointChoice]:
    """Score every checkpoint expert of each skill (default: all of the run's) on its held-out
    prompts, record the best in selection.json and return the choices. A current selection of a
    skill is reused as it is."""
    settings = run.evaluate
    metric = selection_metric(settings)
    scorer = build_scorer(metric, settings)
    names = list(skills) if skills is not None else [s.name for s in run.skills]
    if not names:
        raise DatasetError(f"run {run.name!r} has no skills of its own, so there are no checkpoints to select from")
    if settings.prompts_per_skill == 0:
        raise DatasetError(
            "evaluate.prompts_per_skill = 0: checkpoint selection needs held-out prompts; set it to 1 or more"
        )
    prompts = heldout_prompts(run, paths)
    recorded = read_selection(paths)
    choices: dict[str, CheckpointChoice] = {}
    todo: dict[str, tuple[list[tuple[int, Path]], dict[str, Any]]] = {}
    for skill in names:
        run.skill(skill)
        found = _checkpoint_files(paths, skill)
        if not found:
            raise TrainingError(
                what=f"no checkpoint of skill {skill!r} to select from",
                where=str(paths.train_dir(skill) / "checkpoints"),
                remedies=[Remedy.run(f"selma train RECIPE --skill {skill}"), Remedy.run("selma run RECIPE")],
            )
        signature = _signature(run, found, prompts[skill])
        entry = recorded.get(skill)
        if entry is not None and entry.get("signature") == signature:
            choices[skill] = _choice(paths, skill, entry)
        else:
            todo[skill] = (found, signature)
    jobs = [
        EvalJob(
            _variant(step),
            selection_folder(paths) / skill / "images" / variant_folder(_variant(step)),
            path,
            {skill: prompts[skill]},
        )
        for skill, (found, _) in todo.items()
        for step, path in found
    ]
    items = draw_eval_images(run, jobs, progress=progress) if jobs else {}
    for skill, (found, signature) in todo.items():
        document = score_variants(
            {_variant(step): {skill: items[_variant(step)][skill]} for step, _ in found},
            [scorer],
            selection_folder(paths) / skill,
            bootstrap_samples=settings.bootstrap_samples,
            batch_size=settings.batch_size,
        )
        rows = []
        for (step, path), (_, digest) in zip(found, signature["checkpoints"]):
            stats = document["aggregate"][_variant(step)]["overall"][metric]
            rows.append(
                {
                    "step": step,
                    "expert": path.relative_to(paths.root).as_posix(),
                    "sha256": digest,
                    **({"mean": None} if stats is None else stats),
                }
            )
        scored = [row for row in rows if row["mean"] is not None]
        if not scored:
            raise DatasetError(
                f"skill {skill!r}: the {metric} scorer gave no score to any checkpoint image; choose "
                "another evaluate.selection_metric"
            )
        best = max(scored, key=lambda row: (row["mean"], row["step"]))
        recorded[skill] = {
            "metric": metric,
            "best_step": best["step"],
            "expert": best["expert"],
            "sha256": best["sha256"],
            "checkpoints": rows,
            "signature": signature,
        }
        choices[skill] = _choice(paths, skill, recorded[skill])
        log.info("%s: best checkpoint step %d (%s %.4g)", skill, best["step"], metric, best["mean"])
    if todo:
        atomic_write_text(
            paths.selection,
            json.dumps({"format": SELECTION_FORMAT, "skills": recorded}, indent=1, ensure_ascii=False) + "\n",
        )
    return {skill: choices[skill] for skill in names}


def _variant(step: int) -> str:
    return f"checkpoint:step-{step}"
