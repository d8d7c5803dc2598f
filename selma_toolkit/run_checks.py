"""What `selma run` checks before any work: that the run folder's recorded recipe differs from the
new one only where no output on disk depends on the change, and that the experts the recipe lists
(``experts = [...]``: local files, catalog names, Hub repo ids) exist and fit the base model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from selma_toolkit.architectures import Family
from selma_toolkit.config.merge_methods import METHODS
from selma_toolkit.config.recipes import RunRecipe, merge_methods
from selma_toolkit.errors import LoraFormatError, RecipeError, Remedy
from selma_toolkit.models import detect_family
from selma_toolkit.paths import JOINT, RunPaths
from selma_toolkit.recipe import load_run_recipe
from selma_toolkit.stages import load_stages

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExternalExpert:
    """An expert listed in the recipe's ``experts``: the reference, a name for variants, the local file."""

    ref: str
    name: str
    path: Path


# ---------------------------------------------------------------------------- recipe changes


def check_recipe_change(run: RunRecipe, paths: RunPaths) -> None:
    """Refuse to continue a run folder whose recorded recipe differs from ``run`` in a way that
    would mix results with the outputs already there (each stage names those changes:
    ``Stage.recipe_changes``); name every such change and the way out."""
    if not paths.recipe.is_file():
        return
    old = load_run_recipe(paths.recipe)
    problems = [problem for stage in load_stages() for problem in stage.recipe_changes(old, run, paths)]
    if problems:
        raise RecipeError(
            what=f"this run folder was made with a different recipe ({paths.recipe}); continuing would mix results "
            "made with the old and the new settings:",
            where=str(paths.root),
            details=problems,
            remedies=[
                Remedy.do("restore those values"),
                Remedy.change("out", "run folder"),
                Remedy.do("delete the outputs named to redo those stages"),
            ],
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

    family = detect_family(run.base_model, revision=run.revision) if check_fit else None
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
        if family is not None:  # check_fit
            found = guess_architecture(lora)
            if found is not None and found != family.name:
                raise LoraFormatError(
                    f"experts: {ref!r} ({path}) is a LoRA for {found}, but base_model {run.base_model!r} "
                    f"is {family.name}; list only experts trained for this base model"
                )
            _check_layers(run, ref, path, lora, layers, family)
            needs_equal = [m for m in merge_methods(run) if METHODS[m].equal_ranks]  # the method table's rank rule
            if needs_equal and run.skills and lora.ranks() != {run.train.rank}:
                raise LoraFormatError(
                    f"experts: {ref!r} ({path}) has rank {sorted(lora.ranks())}, but the run trains rank {run.train.rank}; "
                    f"the {needs_equal[0]} merge {METHODS[needs_equal[0]].equal_ranks} and needs equal ranks: set train.rank to match, or use "
                    "merge.method = 'delta' (exact sum of updates, any ranks)"
                )
        experts.append(ExternalExpert(ref, name, path))
    return experts


def _check_layers(run: RunRecipe, ref: str, path: Path, lora, layers: dict | None, family: Family) -> None:
    """The expert's layers against the base model's (an error) and the run's targets (a warning)."""
    from selma_toolkit.expert_fit import check_expert_fits, target_difference

    if layers is not None:
        check_expert_fits(lora, layers, source=f"experts: {ref!r} ({path})", base_model=run.base_model)
    difference = target_difference(
        lora,
        run.train.denoiser_targets(family.lora_targets),
        run.train.text_encoder_target_modules if run.train.train_text_encoder else [],
        denoiser=family.denoiser,
    )
    if run.skills and difference:
        log.warning(
            "experts: %r adapts other layers than the run's experts (%s); the merge counts a missing layer as a zero "
            "update, so those layers get only some experts' share",
            ref,
            difference,
        )
