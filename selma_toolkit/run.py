"""`selma run`: a whole SELMA run, stage after stage, and `selma status`: what a run folder holds.

Stages, in order (``config/registries.py``'s ``STAGES``: one class per module of
``selma_toolkit/stages/``; selma_toolkit.paths says where each writes):

1. ``prompts``  per skill: train + held-out prompts (selma_toolkit.prompts)
2. ``images``   per skill: one image per train prompt (selma_toolkit.images)
3. ``train``    per skill, and ``joint`` when the recipe asks for the mixture baseline (selma_toolkit.train)
4. ``select``   the best checkpoint of each skill on held-out prompts, when evaluate.select_checkpoints
5. ``merge``    per method (merge.method and evaluate.merge_methods): the skill experts (best checkpoint
                where a current selection exists, unless ``use_best=False``) plus the recipe's
                ``experts = [...]`` (catalog names, Hub repo ids, local files)
6. ``evaluate`` every variant on the held-out prompts, scores and the report (selma_toolkit.evaluate)

With ``[dpo] enabled`` each skill's Diffusion-DPO expert is trained and merged (train/dpo.py, variant
``dpo``) after stage 5, and with ``[moe] enabled`` the MoE-LoRA gate over the merged experts
(train/moe.py, variant ``moe``): the paper's Table 4 baselines, evaluated next to the merges.

A stage whose outputs are complete is skipped; a partial one is resumed by its own module (each
stage resumes after a kill). Before any work (run_checks.py) the run folder's recorded recipe is
compared with the new one: a change that would mix old and new results (e.g. other image settings
with images on disk: each stage names the recipe fields its outputs depend on) is refused, naming
each change; the listed experts are checked to fit the base model, and each stage checks its
settings. Derived outputs (selection, merges, evaluation) are redone when what they were made
from has changed. One process at a time works in a run folder: `selma run` and `selma evaluate RUN`
hold its lock (io.folder_lock, an OS lock that a killed process never leaves behind) and a second
one is refused, naming the holder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from selma_toolkit.config.recipes import RunRecipe, merge_methods
from selma_toolkit.errors import DatasetError, Remedy, SelmaError
from selma_toolkit.evaluate.benchmark_run import evaluate_benchmark
from selma_toolkit.evaluate.checkpoints import current_selection
from selma_toolkit.io import check_output_folder, folder_lock
from selma_toolkit.paths import RunPaths
from selma_toolkit.recipe import write_resolved_recipe
from selma_toolkit.run_checks import check_recipe_change, resolve_external_experts
from selma_toolkit.stages import ProgressCallback, RunContext, Stage, StageState, load_stages
from selma_toolkit.stages.benchmark import benchmark_variants
from selma_toolkit.stages.evaluate import EvaluateStage, evaluates

log = logging.getLogger(__name__)

StageCallback = Callable[[StageState, Literal["skip", "start", "done"]], None]


@dataclass(frozen=True)
class RunResult:
    root: Path
    experts: list[tuple[str, Path]]  # what was merged, in order
    merged: dict[str, Path]  # merge method -> file
    report: Path | None


def run_status(run: RunRecipe, paths: RunPaths, *, use_best: bool = True) -> list[StageState]:
    """Every stage's state, in order; stages that cannot be judged yet say what they wait for (or
    why they cannot tell). Listed experts that are not local files are resolved through the Hub
    cache (hub.resolve_expert)."""
    try:
        ctx = RunContext(run, paths, use_best, resolve_external_experts(run, check_fit=False))
    except SelmaError as exc:
        ctx = RunContext(run, paths, use_best, externals_error=exc)
    return [_state_or_why_not(stage, ctx, target) for stage in load_stages() for target in stage.targets(ctx)]


def _state_or_why_not(stage: Stage, ctx: RunContext, target: str) -> StageState:
    try:
        return stage.state(ctx, target)
    except SelmaError as exc:
        return StageState(stage.name, target, False, f"cannot tell: {exc}")


def run_pipeline(
    run: RunRecipe,
    paths: RunPaths,
    *,
    use_best: bool = True,
    on_stage: StageCallback | None = None,
    progress: ProgressCallback | None = None,
) -> RunResult:
    """Run every stage of ``run`` into ``paths`` (see the module docstring); return what was made.

    ``on_stage(state, action)`` is called with ``skip`` for a complete stage, ``start`` before and
    ``done`` after a stage that runs; ``progress(label, done, total)`` as work advances.
    ``use_best=False`` merges each skill's final expert even where a checkpoint selection exists.
    """
    notify = on_stage or (lambda state, action: None)
    report = progress or _unshown
    check_output_folder(paths.root)  # read-only checks first: a refused run creates nothing
    check_recipe_change(run, paths)
    ctx = RunContext(run, paths, use_best, resolve_external_experts(run))  # before any work: a misfit expert fails now
    stages = load_stages()
    for stage in stages:
        stage.check(ctx)  # settings (merge weights, scorers) are checked before hours of work
    # One process at a time writes a run folder: a second `selma run` on it is refused here (io.folder_lock).
    with folder_lock(paths.root, "selma run"):
        check_recipe_change(run, paths)  # again under the lock: a run that just ended may have recorded another recipe
        write_resolved_recipe(run, paths.root)
        for stage in stages:
            _run_stage(stage, ctx, notify, report)
    return RunResult(
        paths.root,
        ctx.experts,
        {m: paths.merged(m) for m in merge_methods(run)},
        paths.report if evaluates(run) else None,
    )


def _run_stage(stage: Stage, ctx: RunContext, notify: StageCallback, report: ProgressCallback) -> None:
    """Each target of ``stage``: skipped when complete, else run (resumed)."""
    targets = stage.targets(ctx)
    if targets:
        stage.check_inputs(ctx)
    for target in targets:
        before = stage.state(ctx, target)
        if before.done:
            notify(before, "skip")
            continue
        notify(before, "start")
        stage.run(ctx, target, report)
        notify(stage.state(ctx, target), "done")


def evaluate_run(
    run: RunRecipe, paths: RunPaths, *, use_best: bool = True, progress: ProgressCallback | None = None
) -> Path:
    """`selma evaluate RUN`: redo the merges that are missing or out of date, then evaluate every
    variant on the held-out prompts and write the report; return its index.html."""
    if not evaluates(run):
        raise DatasetError(
            f"run {run.name!r}: nothing to evaluate (it needs skills with held-out prompts; "
            f"evaluate.prompts_per_skill = {run.evaluate.prompts_per_skill})"
        )
    if use_best and run.evaluate.select_checkpoints:
        unselected = [s.name for s in run.skills if current_selection(run, paths, s.name) is None]
        if unselected:
            log.warning(
                "no current checkpoint selection for %s: their final experts are evaluated; run "
                "`selma evaluate %s --checkpoints` first to evaluate the best checkpoints",
                ", ".join(unselected),
                paths.root,
            )
    with folder_lock(paths.root, "selma evaluate"):  # not beside a `selma run` writing this folder
        return _evaluate_locked(run, paths, use_best, progress)


def _evaluate_locked(run: RunRecipe, paths: RunPaths, use_best: bool, progress: ProgressCallback | None) -> Path:
    ctx = RunContext(run, paths, use_best, resolve_external_experts(run))
    missing = [name for name, path in ctx.experts if not path.is_file()]
    if missing:
        raise DatasetError(
            what=f"no expert yet for {', '.join(missing)}",
            where=str(paths.root),
            remedies=[Remedy.run("selma run RECIPE"), Remedy.run("selma train RECIPE --skill NAME")],
        )
    _redo_stale(ctx)
    EvaluateStage().run(ctx, "", progress or _unshown)
    return paths.report


def benchmark_run(
    run: RunRecipe, paths: RunPaths, name: str, *, use_best: bool = True, progress: ProgressCallback | None = None
) -> dict:
    """`selma evaluate RUN --benchmark NAME`: redo the merges that are out of date (where their experts
    exist), then run benchmark ``name`` on base and the merges (or ``evaluate.benchmark_variants``);
    return benchmark.json's document (selma_toolkit.evaluate.benchmark_run)."""
    with folder_lock(paths.root, "selma evaluate"):
        ctx = RunContext(run, paths, use_best, resolve_external_experts(run))
        _redo_stale(ctx)
        report = progress or _unshown
        return evaluate_benchmark(
            run,
            paths,
            name,
            benchmark_variants(ctx),
            progress=lambda done, total: report(f"{name} images", done, total),
        )


def _redo_stale(ctx: RunContext) -> None:
    """Redo the stages that only combine other outputs (the merges) where out of date and their inputs exist."""
    for stage in load_stages():
        if not stage.redone_before_evaluation:
            continue
        for target in stage.targets(ctx):
            if all(path.is_file() for path in stage.inputs(ctx, target)) and not stage.state(ctx, target).done:
                log.info(
                    "%s %s: out of date; redoing it from %s",
                    stage.name,
                    target,
                    ", ".join(path.name for path in stage.inputs(ctx, target)),
                )
                stage.run(ctx, target, _unshown)


def _unshown(label: str, done: int, total: int | None) -> None:
    """Progress that nobody shows."""
