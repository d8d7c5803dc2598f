"""The study's trained variants (selma_toolkit.toyworld.study): experts per data kind, their
merges, the model a second round draws with, and the paper's Table 4 baselines."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from selma_toolkit.config.recipes import RunRecipe
from selma_toolkit.models import load_pipeline
from selma_toolkit.paths import RunPaths
from selma_toolkit.toyworld.study_kinds import DPO_EXPERT

log = logging.getLogger(__name__)

Progress = Callable[[str, int, "int | None"], None]


def train_experts(run: RunRecipe, paths: RunPaths, names: list[str], label: str, progress: Progress) -> None:
    """Train (or resume) the experts ``names`` (skills, or JOINT) of a run folder; finished ones are skipped."""
    from selma_toolkit.train import train_expert

    for name in names:
        if not paths.expert(name).is_file():
            train_expert(run, name, paths, progress=lambda e, n=name: progress(f"{label} {n}", e.done, e.total))


def merge_experts(run: RunRecipe, paths: RunPaths, skills: list[str], methods: list[str]) -> None:
    """Merge the skills' experts of a run folder with each method (the recipe's merge settings), once."""
    from selma_toolkit.lora.merge import merge_files

    for method in methods:
        if not paths.merged(method).is_file():
            merge_files(
                [paths.expert(s) for s in skills],
                paths.merged(method),
                method,
                run.merge.weights,  # type: ignore[arg-type]
                run.merge.rank,
                format=run.train.lora_format,
                density=run.merge.density,
                seed=run.merge.seed,
            )


def fused_model(run: RunRecipe, lora: Path, folder: Path) -> Path:
    """The base model with ``lora`` folded into its weights, saved as a diffusers folder (float32,
    safetensors) at ``folder``: the model a second round draws its images with. Written once
    (into a partial folder, then renamed), so a rerun reuses it."""
    import shutil

    import torch

    from selma_toolkit.adapters.diffusers import load_experts

    if (folder / "model_index.json").is_file():
        return folder
    pipe = load_pipeline(run.base_model, revision=run.revision, device="cpu", dtype="float32")
    load_experts(pipe, [lora], method="selma", fuse=True, adapter_name="round1")
    pipe.unload_lora_weights()  # the LoRA layers go; the fused weights stay (diffusers' fuse-then-save recipe)
    partial = folder.with_name(f".{folder.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    pipe.to(torch.float32).save_pretrained(partial, safe_serialization=True)
    partial.rename(folder)
    return folder


def table4_baselines(
    run: RunRecipe, selma: RunPaths, skills: list[str], kinds: tuple[str, ...], progress: Progress
) -> dict[str, tuple[Path | None, list[str]]]:
    """Train the ``dpo`` / ``moe`` kinds from the SELMA run folder; their evaluation variants."""
    variants: dict[str, tuple[Path | None, list[str]]] = {}
    if "dpo" in kinds:
        from selma_toolkit.train.dpo import (
            dpo_is_current,
            dpo_merge_is_current,
            dpo_merged,
            dpo_paths,
            merge_dpo,
            preference_pairs,
            train_dpo_expert,
        )

        trained = []
        for skill in skills:
            if not dpo_is_current(run, selma, skill)[0]:
                if not preference_pairs(
                    run, skill, selma
                ):  # every pair a tie: left out, as a filter that keeps nothing
                    log.warning(
                        "%s: every DPO preference pair is a tie; no DPO expert (raise dpo.pairs_per_prompt)", skill
                    )
                    continue
                train_dpo_expert(run, skill, selma, progress=lambda e, s=skill: progress(f"dpo {s}", e.done, e.total))
            trained.append(skill)
        variants.update({f"{DPO_EXPERT}:{s}": (dpo_paths(selma).expert(s), [s]) for s in trained})
        if trained == skills:  # the variant "dpo" is the merge of every skill's DPO expert
            if not dpo_merge_is_current(run, selma):
                merge_dpo(run, selma)
            variants["dpo"] = (dpo_merged(run, selma), skills)
    if "moe" in kinds:
        from selma_toolkit.train.moe import moe_file, moe_is_current, train_moe

        experts = [(s, selma.expert(s)) for s in skills]
        if not moe_is_current(run, selma, experts)[0]:
            train_moe(run, selma, experts, progress=lambda e: progress("moe gate", e.done, e.total))
        variants["moe"] = (moe_file(selma), skills)
    return variants
