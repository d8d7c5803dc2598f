"""The MoE-LoRA baseline (paper Table 4, ``[moe] enabled``): a learned gate over the merged experts,
kept frozen, evaluated as variant ``moe`` (train/moe.py)."""

from __future__ import annotations

from pathlib import Path

from selma_toolkit.stages import ProgressCallback, RunContext, Stage, StageState
from selma_toolkit.train.moe import moe_file, moe_is_current, moe_train_dir, train_moe


class MoEStage(Stage):
    name = "train"

    def targets(self, ctx: RunContext) -> list[str]:
        return ["moe"] if ctx.run.moe.enabled else []

    def inputs(self, ctx: RunContext, target: str) -> list[Path]:
        return [path for _, path in ctx.experts]

    def outputs(self, ctx: RunContext, target: str) -> list[Path]:
        return [moe_train_dir(ctx.paths), moe_file(ctx.paths)]

    def state(self, ctx: RunContext, target: str) -> StageState:
        """Done when the MoE-LoRA holds exactly the merged experts (sha256), the recipe's gate and moe.steps."""
        missing = ctx.missing_experts()
        if missing:
            return StageState(self.name, target, False, f"waits for {', '.join(missing)}")
        done, detail = moe_is_current(ctx.run, ctx.paths, ctx.experts)
        return StageState(self.name, target, done, detail)

    def run(self, ctx: RunContext, target: str, progress: ProgressCallback) -> None:
        train_moe(ctx.run, ctx.paths, ctx.experts, progress=lambda e: progress("moe gate", e.done, e.total))
