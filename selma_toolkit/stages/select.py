"""The best checkpoint of each skill on its held-out prompts, when ``evaluate.select_checkpoints``
(selma_toolkit.evaluate.checkpoints); the merge then takes it instead of the final expert."""

from __future__ import annotations

from pathlib import Path

from selma_toolkit.evaluate.checkpoints import current_selection, select_checkpoints, selection_folder
from selma_toolkit.evaluate.scorers import build_scorers
from selma_toolkit.stages import ProgressCallback, RunContext, Stage, StageState


class SelectStage(Stage):
    name = "select"

    def targets(self, ctx: RunContext) -> list[str]:
        return [""] if ctx.run.evaluate.select_checkpoints and ctx.use_best and ctx.run.skills else []

    def inputs(self, ctx: RunContext, target: str) -> list[Path]:
        return [path for s in ctx.run.skills for path in (ctx.paths.prompts(s.name), ctx.paths.train_dir(s.name))]

    def outputs(self, ctx: RunContext, target: str) -> list[Path]:
        return [selection_folder(ctx.paths)]

    def state(self, ctx: RunContext, target: str) -> StageState:
        """Done when every skill has a current checkpoint selection (evaluate/checkpoints.py)."""
        choices = {s.name: current_selection(ctx.run, ctx.paths, s.name) for s in ctx.run.skills}
        detail = ", ".join(f"{skill}: step {c.step}" if c else f"{skill}: not selected" for skill, c in choices.items())
        return StageState(self.name, target, all(choices.values()), detail)

    def run(self, ctx: RunContext, target: str, progress: ProgressCallback) -> None:
        select_checkpoints(ctx.run, ctx.paths, progress=lambda done, total: progress("checkpoint images", done, total))

    def check(self, ctx: RunContext) -> None:
        """The scorer settings, before hours of training."""
        if self.targets(ctx):
            build_scorers(ctx.run.evaluate)
