"""What `selma run` checks before any work: that the run folder's recorded recipe differs from the
new one only where no output on disk depends on the change, and that the experts the recipe lists
(``experts = [...]``: local files, catalog names, Hub repo ids) exist and fit the base model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selma_toolkit.errors import LoraFormatError, RecipeError, Remedy
from selma_toolkit.paths import JOINT, RunPaths
from selma_toolkit.lora.merging.methods import METHODS
from selma_toolkit.recipe import RunRecipe, load_run_recipe

log = logging.getLogger(__name__)

# Image settings that change how images are drawn, not the pixels (images/generate.py records the rest).
_IMAGE_EXECUTION_KEYS = {"batch_size", "attention_slicing", "vae_tiling", "cpu_offload"}


@dataclass(frozen=True)
class ExternalExpert:
    """An expert listed in the recipe's ``experts``: the reference, a name for variants, the local file."""

    ref: str
    name: str
    path: Path


def merge_methods(run: RunRecipe) -> list[str]:
    """The recipe's merge method, then evaluate.merge_methods, each once."""
    return list(dict.fromkeys([run.merge.method, *run.evaluate.merge_methods]))


# ---------------------------------------------------------------------------- recipe changes


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def _changes(old: Any, new: Any, prefix: str, skip: set[str] = frozenset()) -> list[str]:
    # context "hash": an unset train.target_modules compares as the list that was the default (recipe.py),
    # so run folders recorded before the default became per-family continue.
    dump = {"mode": "json", "context": {"hash": True}}
    before, after = _flat(old.model_dump(**dump), prefix), _flat(new.model_dump(**dump), prefix)
    return [f"{key}: {before.get(key)!r} -> {after.get(key)!r}" for key in sorted(set(before) | set(after))
            if key.removeprefix(prefix) not in skip and before.get(key) != after.get(key)]


def _has_images(paths: RunPaths, skill: str) -> bool:
    folder = paths.images(skill)
    return folder.is_dir() and any(folder.glob("*.txt"))


def _has_training(paths: RunPaths, name: str) -> bool:
    return (paths.train_dir(name) / "checkpoints").is_dir() or paths.expert(name).is_file()


def check_recipe_change(run: RunRecipe, paths: RunPaths) -> None:
    """Refuse to continue a run folder whose recorded recipe differs from ``run`` in a way that
    would mix results with the outputs already there; name every such change and the way out."""
    if not paths.recipe.is_file():
        return
    from selma_toolkit.train.checkpoint import RESUMABLE_CHANGES

    old = load_run_recipe(paths.recipe)
    old_skills = {s.name: s for s in old.skills}
    images = [s for s in old_skills if _has_images(paths, s)]
    trained = [s for s in [*old_skills, JOINT] if _has_training(paths, s)]
    problems: list[str] = []
    if images:
        where = f"images exist for {', '.join(images)}"
        problems += [f"{c} ({where})" for c in _changes(old.images, run.images, "images.", _IMAGE_EXECUTION_KEYS)]
        if old.image_model != run.image_model or (old.images.model is None and old.revision != run.revision):
            problems.append(f"image model: {old.image_model!r}@{old.revision} -> {run.image_model!r}@{run.revision} ({where})")
    if trained:
        where = f"experts trained or training: {', '.join(trained)}"
        if (old.base_model, old.revision) != (run.base_model, run.revision):
            problems.append(f"base_model: {old.base_model!r}@{old.revision} -> {run.base_model!r}@{run.revision} ({where})")
        problems += [f"{c} ({where})" for c in _changes(old.train, run.train, "train.", RESUMABLE_CHANGES)]
    if JOINT in trained and run.joint and [s.name for s in run.skills] != list(old_skills):
        problems.append(f"skills: {list(old_skills)} -> {[s.name for s in run.skills]} (the joint baseline was trained on "
                        "the old skills' data)")
    for skill in run.skills:
        previous = old_skills.get(skill.name)
        if previous is not None and paths.prompts(skill.name).exists():
            problems += [f"{c} (prompts exist for {skill.name})" for c in _changes(previous, skill, f"skills.{skill.name}.")]
    if problems:
        raise RecipeError(
            what=f"this run folder was made with a different recipe ({paths.recipe}); continuing would mix results "
            "made with the old and the new settings:", where=str(paths.root), details=problems,
            remedies=[Remedy.do("restore those values"), Remedy.change("out", "run folder"),
                      Remedy.do("delete the outputs named to redo those stages")],
        )


# --------------------------------------------------------------------------- external experts


def resolve_external_experts(run: RunRecipe, *, check_fit: bool = True) -> list[ExternalExpert]:
    """The recipe's ``experts`` as local files (experts.resolve_expert_file: local file, catalog name or
    Hub repo id), checked to fit the base model: same architecture, every adapted layer present in
    the model with its shape (expert_fit.py), and for the ``selma`` merge (which averages factors)
    the rank the run trains with. Runs before any training."""
    if not run.experts:
        return []
    from selma_toolkit.experts import resolve_expert_file
    from selma_toolkit.lora import guess_architecture, load_lora, metadata_value
    from selma_toolkit.models import detect_architecture

    architecture = detect_architecture(run.base_model, revision=run.revision) if check_fit else None
    if check_fit:
        from selma_toolkit.expert_fit import base_layer_shapes
    layers = base_layer_shapes(run.base_model, revision=run.revision) if check_fit else None
    taken = {s.name for s in run.skills} | {JOINT}
    experts = []
    for ref in run.experts:
        path = resolve_expert_file(ref).path
        lora = load_lora(path)
        name = metadata_value(lora, "skill") or path.stem
        if name in taken:
            name = path.stem if path.stem not in taken else f"{path.stem}-{len(experts) + 1}"
        taken.add(name)
        if check_fit:
            found = guess_architecture(lora)
            if found is not None and found != architecture:
                raise LoraFormatError(f"experts: {ref!r} ({path}) is a LoRA for {found}, but base_model {run.base_model!r} "
                                      f"is {architecture}; list only experts trained for this base model")
            _check_layers(run, ref, path, lora, layers, architecture)
            needs_equal = [m for m in merge_methods(run) if METHODS[m].equal_ranks]  # the method table's rank rule
            if needs_equal and run.skills and lora.ranks() != {run.train.rank}:
                raise LoraFormatError(
                    f"experts: {ref!r} ({path}) has rank {sorted(lora.ranks())}, but the run trains rank {run.train.rank}; "
                    f"the {needs_equal[0]} merge {METHODS[needs_equal[0]].equal_ranks} and needs equal ranks: set train.rank to match, or use "
                    "merge.method = 'delta' (exact sum of updates, any ranks)")
        experts.append(ExternalExpert(ref, name, path))
    return experts


def _check_layers(run: RunRecipe, ref: str, path: Path, lora, layers: dict | None, architecture: str) -> None:
    """The expert's layers against the base model's (an error) and the run's targets (a warning)."""
    from selma_toolkit.architectures import get_family
    from selma_toolkit.expert_fit import check_expert_fits, target_difference

    if layers is not None:
        check_expert_fits(lora, layers, source=f"experts: {ref!r} ({path})", base_model=run.base_model)
    family = get_family(architecture)
    difference = target_difference(lora, run.train.denoiser_targets(family.lora_targets),
                                   run.train.text_encoder_target_modules if run.train.train_text_encoder else [],
                                   denoiser=family.denoiser)
    if run.skills and difference:
        log.warning(
            "experts: %r adapts other layers than the run's experts (%s); the merge counts a missing layer as a zero "
            "update, so those layers get only some experts' share", ref, difference)
