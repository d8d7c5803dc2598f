"""Stage 1, per skill: the skill's train prompts and its held-out prompts (selma_toolkit.prompts)."""

from __future__ import annotations

from pathlib import Path

from selma_toolkit.config.recipes import RunRecipe
from selma_toolkit.dataset import read_prompts
from selma_toolkit.paths import RunPaths
from selma_toolkit.prompts import generate_prompts
from selma_toolkit.recipe import changed_fields
from selma_toolkit.stages import ProgressCallback, RunContext, Stage, StageState


class PromptsStage(Stage):
    name = "prompts"

    def targets(self, ctx: RunContext) -> list[str]:
        return [s.name for s in ctx.run.skills]

    def outputs(self, ctx: RunContext, skill: str) -> list[Path]:
        return [ctx.paths.prompts(skill)]

    def state(self, ctx: RunContext, skill: str) -> StageState:
        """Done when the prompt file holds the skill's train prompts and evaluate.prompts_per_skill held-out ones."""
        wanted, heldout = ctx.run.skill(skill).num_prompts, ctx.run.evaluate.prompts_per_skill
        path = ctx.paths.prompts(skill)
        records = read_prompts(path, repair_tail=True) if path.is_file() else []
        train = sum(r.split == "train" for r in records)
        held = sum(r.split == "heldout" for r in records)
        return StageState(
            self.name,
            skill,
            train >= wanted and held >= heldout,
            f"{min(train, wanted)}/{wanted} train, {min(held, heldout)}/{heldout} held-out",
        )

    def run(self, ctx: RunContext, skill: str, progress: ProgressCallback) -> None:
        generate_prompts(
            ctx.run.skill(skill),
            ctx.paths.prompts(skill),
            ctx.run.evaluate.prompts_per_skill,
            progress=lambda stats: progress(f"prompts {skill}", stats.kept, stats.target),
        )

    def recipe_changes(self, old: RunRecipe, new: RunRecipe, paths: RunPaths) -> list[str]:
        """A skill recipe, once the skill's prompts exist."""
        old_skills = {s.name: s for s in old.skills}
        return [
            f"{change} (prompts exist for {skill.name})"
            for skill in new.skills
            if skill.name in old_skills and paths.prompts(skill.name).exists()
            for change in changed_fields(old_skills[skill.name], skill, f"skills.{skill.name}.")
        ]
