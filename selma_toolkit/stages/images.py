"""Stage 2, per skill: one image per train prompt (selma_toolkit.images)."""

from __future__ import annotations

from pathlib import Path

from selma_toolkit.config.recipes import RunRecipe
from selma_toolkit.dataset import METADATA, read_prompts
from selma_toolkit.images import check_image_inputs, generate_images, image_name
from selma_toolkit.io import read_jsonl
from selma_toolkit.paths import RunPaths
from selma_toolkit.recipe import changed_fields
from selma_toolkit.stages import ProgressCallback, RunContext, Stage, StageState

# Image settings that change how images are drawn, not the pixels (images/generate.py records the rest).
EXECUTION_KEYS = {"batch_size", "attention_slicing", "vae_tiling", "cpu_offload"}


def has_images(paths: RunPaths, skill: str) -> bool:
    folder = paths.images(skill)
    return folder.is_dir() and any(folder.glob("*.txt"))


class ImagesStage(Stage):
    name = "images"

    def targets(self, ctx: RunContext) -> list[str]:
        return [s.name for s in ctx.run.skills]

    def inputs(self, ctx: RunContext, skill: str) -> list[Path]:
        return [ctx.paths.prompts(skill)]

    def outputs(self, ctx: RunContext, skill: str) -> list[Path]:
        return [ctx.paths.images(skill)]

    def state(self, ctx: RunContext, skill: str) -> StageState:
        """Done when every train prompt has its image and caption and metadata.jsonl lists them all."""
        folder, image_format = ctx.paths.images(skill), ctx.run.images.image_format
        prompt_file = ctx.paths.prompts(skill)
        train = read_prompts(prompt_file, split="train", repair_tail=True) if prompt_file.is_file() else []
        drawn = sum(
            (folder / image_name(p.id, "txt")).is_file() and (folder / image_name(p.id, image_format)).is_file()
            for p in train
        )
        listed = (
            {row.get("prompt_id") for row in read_jsonl(folder / METADATA)} if (folder / METADATA).is_file() else set()
        )
        done = bool(train) and drawn == len(train) and listed >= {p.id for p in train}
        note = "" if done or not drawn else ", dataset not finished"
        return StageState(self.name, skill, done, f"{drawn}/{len(train)} images{note}")

    def run(self, ctx: RunContext, skill: str, progress: ProgressCallback) -> None:
        generate_images(
            ctx.run, skill, ctx.paths, progress=lambda done, total: progress(f"images {skill}", done, total)
        )

    def check_inputs(self, ctx: RunContext) -> None:
        """Every skill's prompts and the image model, before hours are spent drawing the first skill."""
        for skill in self.targets(ctx):
            check_image_inputs(ctx.run, skill, ctx.paths)

    def recipe_changes(self, old: RunRecipe, new: RunRecipe, paths: RunPaths) -> list[str]:
        """The image settings that change pixels and the image model, once any skill has images."""
        images = [s.name for s in old.skills if has_images(paths, s.name)]
        if not images:
            return []
        where = f"images exist for {', '.join(images)}"
        problems = [f"{c} ({where})" for c in changed_fields(old.images, new.images, "images.", EXECUTION_KEYS)]
        if old.image_model != new.image_model or (old.images.model is None and old.revision != new.revision):
            problems.append(
                f"image model: {old.image_model!r}@{old.revision} -> {new.image_model!r}@{new.revision} ({where})"
            )
        return problems
