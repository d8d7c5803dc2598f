"""The DPO variant (paper Table 4, ``[dpo] enabled``): per skill a Diffusion-DPO expert on scored
pairs of base images, then the DPO experts merged, evaluated as variant ``dpo`` (train/dpo.py)."""

from __future__ import annotations

from pathlib import Path

from selma_toolkit.stages import ProgressCallback, RunContext, Stage, StageState
from selma_toolkit.train.dpo import (
    PAIR_IMAGES,
    dpo_is_current,
    dpo_merge_is_current,
    dpo_merged,
    dpo_paths,
    merge_dpo,
    train_dpo_expert,
)

PREFIX = "dpo:"  # the targets are shown as train dpo:<skill> in `selma status`


class DPOStage(Stage):
    name = "train"

    def targets(self, ctx: RunContext) -> list[str]:
        return [f"{PREFIX}{s.name}" for s in ctx.run.skills] if ctx.run.dpo.enabled else []

    def inputs(self, ctx: RunContext, target: str) -> list[Path]:
        return [ctx.paths.prompts(target.removeprefix(PREFIX))]

    def outputs(self, ctx: RunContext, target: str) -> list[Path]:
        skill, folder = target.removeprefix(PREFIX), dpo_paths(ctx.paths)
        return [folder.root / PAIR_IMAGES / skill, folder.skill_dir(skill), folder.expert(skill)]

    def state(self, ctx: RunContext, target: str) -> StageState:
        """Done when the skill's DPO expert has dpo.steps of training and is written."""
        done, detail = dpo_is_current(ctx.run, ctx.paths, target.removeprefix(PREFIX))
        return StageState(self.name, target, done, detail)

    def run(self, ctx: RunContext, target: str, progress: ProgressCallback) -> None:
        skill = target.removeprefix(PREFIX)
        train_dpo_expert(ctx.run, skill, ctx.paths, progress=lambda e: progress(f"dpo {skill}", e.done, e.total))


class DPOMergeStage(Stage):
    name = "merge"
    redone_before_evaluation = True

    def targets(self, ctx: RunContext) -> list[str]:
        return ["dpo"] if ctx.run.dpo.enabled else []

    def inputs(self, ctx: RunContext, target: str) -> list[Path]:
        return [dpo_paths(ctx.paths).expert(s.name) for s in ctx.run.skills]

    def outputs(self, ctx: RunContext, target: str) -> list[Path]:
        return [dpo_merged(ctx.run, ctx.paths)]

    def state(self, ctx: RunContext, target: str) -> StageState:
        """Done when the merged DPO file records exactly the current DPO experts."""
        done = dpo_merge_is_current(ctx.run, ctx.paths)
        return StageState(
            self.name,
            target,
            done,
            f"{ctx.run.merge.method} merge of the DPO experts, "
            f"{dpo_merged(ctx.run, ctx.paths).name}" + ("" if done else ": not merged yet or out of date"),
        )

    def run(self, ctx: RunContext, target: str, progress: ProgressCallback) -> None:
        merge_dpo(ctx.run, ctx.paths)
