"""Stage 4, per merge method (``merge.method`` and ``evaluate.merge_methods``): the experts merged
into one LoRA (selma_toolkit.lora.merge): every skill's expert (its best checkpoint where a current
selection exists) and the recipe's listed experts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from selma_toolkit.config.merge_methods import recorded_settings
from selma_toolkit.config.recipes import RunRecipe, merge_methods
from selma_toolkit.io import sha256_file
from selma_toolkit.lora.merge import expert_weights, merge_files, metadata_record
from selma_toolkit.stages import ProgressCallback, RunContext, Stage, StageState


def merge_settings(run: RunRecipe, method: str, count: int) -> dict[str, Any]:
    """The merge record fields (lora/merging/record.py) a merge of ``count`` experts with the recipe's
    settings has; which settings a method records is the method table's rule (``recorded_settings``)."""
    settings = recorded_settings(method, rank=run.merge.rank, density=run.merge.density, seed=run.merge.seed)
    del settings["svd_mode"]  # recipes always merge with the exact SVD: never compared
    return {"method": method, "weights": expert_weights(run.merge.weights, count, method=method), **settings}


class MergeStage(Stage):
    name = "merge"
    redone_before_evaluation = True

    def targets(self, ctx: RunContext) -> list[str]:
        return merge_methods(ctx.run)

    def inputs(self, ctx: RunContext, method: str) -> list[Path]:
        return [path for _, path in ctx.experts]

    def outputs(self, ctx: RunContext, method: str) -> list[Path]:
        return [ctx.paths.merged(method)]

    def state(self, ctx: RunContext, method: str) -> StageState:
        """Done when merged/<method>.safetensors records exactly these inputs (sha256) and settings."""
        missing = ctx.missing_experts()
        if missing:
            return StageState(self.name, method, False, f"waits for {', '.join(missing)}")
        inputs, path = ctx.experts, ctx.paths.merged(method)
        names = ", ".join(name for name, _ in inputs)
        if not path.is_file():
            return StageState(self.name, method, False, f"not merged yet ({names})")
        try:
            with safe_open(str(path), framework="pt") as handle:
                record = metadata_record(handle.metadata() or {}) or {}
        except (SafetensorError, OSError, ValueError):  # damaged (truncated, overwritten): merged again, atomically
            return StageState(self.name, method, False, f"{len(inputs)} experts ({names}), {path.name} is damaged")
        wanted = merge_settings(ctx.run, method, len(inputs))
        current = [e.get("sha256") for e in record.get("experts", [])] == [sha256_file(p) for _, p in inputs] and all(
            record.get(key) == value for key, value in wanted.items()
        )
        return StageState(
            self.name, method, current, f"{len(inputs)} experts ({names})" + ("" if current else ", out of date")
        )

    def run(self, ctx: RunContext, method: str, progress: ProgressCallback) -> None:
        run, inputs = ctx.run, ctx.experts
        settings = merge_settings(run, method, len(inputs))
        merge_files(
            [path for _, path in inputs],
            ctx.paths.merged(method),
            method,
            run.merge.weights,  # type: ignore[arg-type]
            settings["rank"],
            format=run.train.lora_format,
            density=run.merge.density,
            seed=run.merge.seed,
        )

    def check(self, ctx: RunContext) -> None:
        """The merge weights: one per expert (the skills' and the listed ones)."""
        for method in self.targets(ctx):
            expert_weights(ctx.run.merge.weights, len(ctx.run.skills) + len(ctx.externals), method=method)
