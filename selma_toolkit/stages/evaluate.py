"""The evaluation: every variant drawn on the held-out prompts, scored, and the report
(selma_toolkit.evaluate.generate). Variants: ``base``, every merged expert, ``joint`` (when
trained), every merge, and the paper's Table 4 baselines where trained (``moe``, ``dpo``)."""

from __future__ import annotations

from pathlib import Path

from selma_toolkit.config.recipes import RunRecipe, merge_methods
from selma_toolkit.evaluate.generate import evaluate_variants, evaluation_is_current
from selma_toolkit.paths import JOINT, RunPaths
from selma_toolkit.stages import ProgressCallback, RunContext, Stage, StageState
from selma_toolkit.train.dpo import dpo_merged
from selma_toolkit.train.moe import moe_file


def evaluates(run: RunRecipe) -> bool:
    """Whether the run has something to evaluate: skills with held-out prompts."""
    return bool(run.skills) and run.evaluate.prompts_per_skill > 0


def baseline_variants(run: RunRecipe, paths: RunPaths) -> dict[str, Path]:
    """The paper's Table 4 baselines where trained: ``moe`` (MoE-LoRA file) and ``dpo`` (the merged DPO experts)."""
    found = {"moe": moe_file(paths), "dpo": dpo_merged(run, paths)}
    return {name: path for name, path in found.items() if path.is_file()}


def eval_variants(ctx: RunContext) -> dict[str, Path | None]:
    """``{variant: LoRA file or None}``: base, every merged expert, joint (when trained), every merge."""
    run, paths = ctx.run, ctx.paths
    variants: dict[str, Path | None] = {"base": None}
    variants.update({f"expert:{name}": path for name, path in ctx.experts})
    if run.joint and paths.expert(JOINT).is_file():
        variants["joint"] = paths.expert(JOINT)
    variants.update({f"merged:{m}": paths.merged(m) for m in merge_methods(run) if paths.merged(m).is_file()})
    variants.update(baseline_variants(run, paths))
    return variants


class EvaluateStage(Stage):
    name = "evaluate"

    def targets(self, ctx: RunContext) -> list[str]:
        return [""] if evaluates(ctx.run) else []

    def inputs(self, ctx: RunContext, target: str) -> list[Path]:
        loras = [path for path in eval_variants(ctx).values() if path is not None]
        return [ctx.paths.prompts(s.name) for s in ctx.run.skills] + loras

    def outputs(self, ctx: RunContext, target: str) -> list[Path]:
        return [ctx.paths.eval_dir, ctx.paths.report]

    def state(self, ctx: RunContext, target: str) -> StageState:
        """Done when scores and report were made from exactly the current variants and settings."""
        if ctx.missing_experts():
            return StageState(self.name, target, False, "waits for the experts")
        variants = eval_variants(ctx)
        done = evaluation_is_current(ctx.run, ctx.paths, variants)
        state = (
            f"report {ctx.paths.report}"
            if done
            else "out of date"
            if ctx.paths.report.is_file()
            else "not evaluated yet"
        )
        return StageState(self.name, target, done, f"{state}; {len(variants)} variants")

    def run(self, ctx: RunContext, target: str, progress: ProgressCallback) -> None:
        evaluate_variants(
            ctx.run,
            ctx.paths,
            eval_variants(ctx),
            progress=lambda done, total: progress("evaluation images", done, total),
        )
