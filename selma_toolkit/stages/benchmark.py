"""The recipe's published benchmark (``[evaluate] benchmark``): base and the merges (or
``evaluate.benchmark_variants``) drawn on its prompts, judged and summarised
(selma_toolkit.evaluate.benchmark_run), after the held-out evaluation."""

from __future__ import annotations

from pathlib import Path

from selma_toolkit.errors import DatasetError, Option, Remedy
from selma_toolkit.evaluate.benchmark_run import benchmark_dir, benchmark_is_current, evaluate_benchmark
from selma_toolkit.stages import ProgressCallback, RunContext, Stage, StageState
from selma_toolkit.stages.evaluate import eval_variants


def benchmark_variants(ctx: RunContext) -> dict[str, Path | None]:
    """``{variant: LoRA file or None}``: ``evaluate.benchmark_variants``, else base and every merge written."""
    available = {v: path for v, path in eval_variants(ctx).items() if path is None or path.is_file()}
    wanted = ctx.run.evaluate.benchmark_variants or ["base", *(v for v in available if v.startswith("merged:"))]
    missing = [v for v in wanted if v not in available]
    if missing:
        raise DatasetError(
            what=f"the run has no {', '.join(missing)} yet",
            where=Option("benchmark_variants"),
            found=missing,
            expected=f"some of {', '.join(available)}",
            remedies=[Remedy.run(f"selma run {ctx.paths.recipe}", note="to make them")],
        )
    return {v: available[v] for v in wanted}


class BenchmarkStage(Stage):
    name = "benchmark"

    def targets(self, ctx: RunContext) -> list[str]:
        return [ctx.run.evaluate.benchmark] if ctx.run.evaluate.benchmark else []

    def inputs(self, ctx: RunContext, target: str) -> list[Path]:
        return [path for path in benchmark_variants(ctx).values() if path is not None]

    def outputs(self, ctx: RunContext, target: str) -> list[Path]:
        return [benchmark_dir(ctx.paths, target)]

    def state(self, ctx: RunContext, target: str) -> StageState:
        """Done when benchmark.json was made from exactly the current variants and settings."""
        if ctx.missing_experts():
            return StageState(self.name, target, False, "waits for the experts")
        variants = benchmark_variants(ctx)
        done = benchmark_is_current(ctx.run, ctx.paths, target, variants)
        folder = benchmark_dir(ctx.paths, target)
        state = f"{folder / 'benchmark.json'}" if done else "out of date" if folder.exists() else "not run yet"
        return StageState(self.name, target, done, f"{state}; {', '.join(variants)}")

    def run(self, ctx: RunContext, target: str, progress: ProgressCallback) -> None:
        evaluate_benchmark(
            ctx.run,
            ctx.paths,
            target,
            benchmark_variants(ctx),
            progress=lambda done, total: progress(f"{target} images", done, total),
        )
