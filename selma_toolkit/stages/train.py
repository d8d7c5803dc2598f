"""Stage 3, per skill and for the mixture baseline (``joint``): the LoRA experts (selma_toolkit.train)."""

from __future__ import annotations

from pathlib import Path

from selma_toolkit.config.recipes import RunRecipe
from selma_toolkit.paths import JOINT, RunPaths
from selma_toolkit.recipe import changed_fields
from selma_toolkit.stages import ProgressCallback, RunContext, Stage, StageState
from selma_toolkit.train import train_expert
from selma_toolkit.train.checkpoint import RESUMABLE_CHANGES, checkpoints


def has_training(paths: RunPaths, name: str) -> bool:
    return (paths.train_dir(name) / "checkpoints").is_dir() or paths.expert(name).is_file()


class TrainStage(Stage):
    name = "train"

    def targets(self, ctx: RunContext) -> list[str]:
        return [s.name for s in ctx.run.skills] + ([JOINT] if ctx.run.joint and ctx.run.skills else [])

    def inputs(self, ctx: RunContext, name: str) -> list[Path]:
        return [ctx.paths.images(s.name) for s in ctx.run.skills] if name == JOINT else [ctx.paths.images(name)]

    def outputs(self, ctx: RunContext, name: str) -> list[Path]:
        return [ctx.paths.train_dir(name), ctx.paths.expert(name)]

    def state(self, ctx: RunContext, name: str) -> StageState:
        """Done when the last checkpoint is at train.steps and the expert file is written."""
        saved = checkpoints(ctx.paths.train_dir(name))
        step = saved[-1].step if saved else 0
        written = ctx.paths.expert(name).is_file()
        return StageState(
            self.name,
            name,
            step == ctx.run.train.steps and written,
            f"step {step}/{ctx.run.train.steps}, {len(saved)} checkpoint(s)" + (", expert written" if written else ""),
        )

    def run(self, ctx: RunContext, name: str, progress: ProgressCallback) -> None:
        train_expert(
            ctx.run,
            name,
            ctx.paths,
            progress=lambda e: progress(f"{'train' if e.kind == 'step' else 'cache'} {name}", e.done, e.total),
        )

    def recipe_changes(self, old: RunRecipe, new: RunRecipe, paths: RunPaths) -> list[str]:
        """The base model and the training settings (but those a resume may change), once an expert
        is trained or training; the skills, once the mixture baseline is."""
        old_skills = [s.name for s in old.skills]
        trained = [s for s in [*old_skills, JOINT] if has_training(paths, s)]
        if not trained:
            return []
        where = f"experts trained or training: {', '.join(trained)}"
        problems = []
        if (old.base_model, old.revision) != (new.base_model, new.revision):
            problems.append(
                f"base_model: {old.base_model!r}@{old.revision} -> {new.base_model!r}@{new.revision} ({where})"
            )
        problems += [f"{c} ({where})" for c in changed_fields(old.train, new.train, "train.", RESUMABLE_CHANGES)]
        if JOINT in trained and new.joint and [s.name for s in new.skills] != old_skills:
            problems.append(
                f"skills: {old_skills} -> {[s.name for s in new.skills]} (the joint baseline was trained on "
                "the old skills' data)"
            )
        return problems
