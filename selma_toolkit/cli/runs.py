"""Commands over a whole run folder: `selma evaluate`, `selma run`, `selma demo`, `selma status`."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from selma_toolkit.cli.app import SetOption, app, console, err_console, run_with_progress, stage_line
from selma_toolkit.config.benchmarks import BENCHMARK_NAMES
from selma_toolkit.errors import InputError

# -------------------------------------------------------------------------------------- evaluate


@app.command("evaluate")
def evaluate(
    run_dir: Annotated[
        Path | None,
        typer.Argument(
            help="A run folder: draw every variant on the held-out prompts, score them and write the report."
        ),
    ] = None,
    checkpoints: Annotated[
        bool,
        typer.Option(
            "--checkpoints",
            help="With RUN: score every saved checkpoint of each skill on held-out prompts; record the best.",
        ),
    ] = False,
    final_experts: Annotated[
        bool,
        typer.Option(
            "--final-experts",
            help="With RUN: evaluate each skill's final expert even where a best checkpoint was selected.",
        ),
    ] = False,
    tally: Annotated[
        list[Path] | None,
        typer.Option(
            "--tally", help="Count a human-evaluation answers file exported from human-eval.html (repeatable: raters)."
        ),
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option("--report", help="Write the HTML report from an evaluation folder holding scores.json."),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Report folder (default: report/ beside the evaluation folder).")
    ] = None,
    pair: Annotated[
        list[str] | None,
        typer.Option(
            help="Human-evaluation pair VARIANT,BASELINE, e.g. merged:selma,base (repeatable; default: merged vs base)."
        ),
    ] = None,
    prompts_per_skill: Annotated[int, typer.Option(help="Prompts per skill in the report's image grids.")] = 4,
    before: Annotated[
        str | None,
        typer.Option(
            help="With RUN: also compare RUN's merged LoRA with this one from before the new skill was added (a previous "
            "run folder, or a merged LoRA file / catalog name / repo id) on the new and the old skills' prompts."
        ),
    ] = None,
    method: Annotated[
        str | None, typer.Option(help="With --before: the merge method to compare (default: the run's).")
    ] = None,
    benchmark: Annotated[
        str | None,
        typer.Option(
            help=f"With RUN: run a published benchmark ({', '.join(BENCHMARK_NAMES)}) on base and the merges instead of "
            "the held-out prompts; its prompts and questions are downloaded on first use at a pinned commit."
        ),
    ] = None,
) -> None:
    """Evaluate a run folder, pick its best checkpoints, tally human answers, or write a report.

    RUN: draw every variant on the held-out prompts, score them, write the report (RUN --checkpoints:
    score every saved checkpoint and record the best; RUN --benchmark NAME: a published benchmark,
    e.g. dsg-1k, judged by its VQA model). --tally: win/tie/lose of human-evaluation answers.
    --report: the HTML report of an evaluation folder holding scores.json.
    """
    if not tally and report is None and run_dir is None:
        raise InputError(
            "selma evaluate: give a run folder RUN, --tally ANSWERS.json (human-evaluation answers) "
            "or --report EVAL_DIR"
        )
    if (checkpoints or final_experts) and run_dir is None:
        raise InputError(
            "selma evaluate: --checkpoints and --final-experts need a run folder, e.g. selma evaluate runs/demo --checkpoints"
        )
    if (before or method) and (run_dir is None or checkpoints):
        raise InputError(
            "selma evaluate: --before (and --method) compare a run folder's merge with an earlier one, "
            "e.g. selma evaluate runs/new-skill --before runs/old-skills"
        )
    if benchmark is not None and (run_dir is None or checkpoints or before):
        raise InputError(
            "selma evaluate: --benchmark runs a published benchmark on a run folder's variants, "
            "e.g. selma evaluate runs/demo --benchmark dsg-1k"
        )
    if benchmark is not None:
        _run_benchmark(run_dir, benchmark, final_experts)
    elif run_dir is not None:
        _evaluate_run_folder(run_dir, checkpoints, final_experts)
    if before is not None:
        _compare_before_after(run_dir, before, method)
    if report is not None:
        from selma_toolkit.evaluate import write_report

        pairs = None
        if pair:
            pairs = [p.split(",") for p in pair]
            bad = [p for p, parts in zip(pair, pairs) if len(parts) != 2 or not all(parts)]
            if bad:
                raise InputError(f"--pair {bad[0]!r}: expected VARIANT,BASELINE, e.g. --pair merged:selma,base")
        target = out or report.resolve().parent / "report"
        index = write_report(report, target, human_eval_pairs=pairs, prompts_per_skill=prompts_per_skill)
        console.print(f"wrote {index}")
    if tally:
        from selma_toolkit.evaluate import tally_files

        # One plain line per pair (as the paper states its study), easy to read and to parse.
        for row in tally_files(tally):
            without_ties = (
                "all ties"
                if row.win_percent_without_ties is None
                else f"{row.win_percent_without_ties:.1f}% vs {100 - row.win_percent_without_ties:.1f}% without ties"
            )
            console.print(
                f"{row.variant} vs {row.baseline}: win {row.win_percent:.1f}%, tie {row.tie_percent:.1f}%, "
                f"lose {row.lose_percent:.1f}% of {row.n} answers ({without_ties})",
                highlight=False,
                soft_wrap=True,
            )


# ------------------------------------------------------------------------------------------- run
# `selma run`, `selma status`, `selma demo`, and `selma evaluate RUN` (the library side: selma_toolkit/run.py).


def _run_recipe(run, paths, use_best: bool) -> None:
    from selma_toolkit.run import run_pipeline

    try:
        result = run_with_progress(
            lambda on_stage, progress: run_pipeline(run, paths, use_best=use_best, on_stage=on_stage, progress=progress)
        )
    except KeyboardInterrupt:
        # Every stage keeps what it finished (atomic writes, resumable files) and the folder's lock
        # is released, so the same command goes on from there.
        command = shlex.join(["selma", *sys.argv[1:]])
        err_console.print(
            f"interrupted: what finished is kept in {escape(str(paths.root))}; run the same command "
            f"again to resume: {escape(command)}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(130) from None
    console.print(f"run folder: {escape(str(result.root))}", highlight=False, soft_wrap=True)
    for method, path in result.merged.items():
        console.print(f"merged LoRA ({method}): {escape(str(path))}", highlight=False, soft_wrap=True)
    if result.report is not None:
        _print_verdicts(paths)
        console.print(f"report: {escape(str(result.report))}", highlight=False, soft_wrap=True)


def _print_verdicts(paths) -> None:
    """Whether each merge (and each expert on its own skill) beat the base: the report's paired changes."""
    from selma_toolkit.evaluate.report import gain_line, headline_gains
    from selma_toolkit.evaluate.scoring import read_scores

    document = read_scores(paths.eval_dir / "scores.json")
    if "base" not in document["variants"]:
        return
    rows = headline_gains(document)
    if not rows:
        console.print(
            "no verdict: each skill needs two or more held-out prompts and seeds shared with the base "
            "(evaluate.prompts_per_skill, evaluate.seeds)",
            highlight=False,
            soft_wrap=True,
        )
        return
    labels = {metric: info["label"] for metric, info in document["scorers"].items()}
    console.print(escape("change vs base on the same prompts and seeds [95% interval], verdict:"), highlight=False)
    for row in rows:
        console.print(f"  {escape(gain_line(row, labels))}", highlight=False, soft_wrap=True)


@app.command("run")
def run_command(
    recipe: Annotated[str, typer.Argument(help="Run recipe file or shipped name.")],
    out: Annotated[
        Path | None, typer.Option(help="Run folder (default: the recipe's output_dir, else runs/<name>).")
    ] = None,
    final_experts: Annotated[
        bool,
        typer.Option(
            "--final-experts", help="Merge each skill's final expert even where a best checkpoint was selected."
        ),
    ] = False,
    set_: SetOption = None,
) -> None:
    """Every stage: prompts -> images -> experts -> (best checkpoints) -> merge -> evaluate -> report.

    Complete stages are skipped and partial ones resumed, so after a stop run the same command again.
    """
    from selma_toolkit.paths import RunPaths
    from selma_toolkit.recipe import load_run_recipe

    run = load_run_recipe(recipe, set_ or [])
    _run_recipe(run, RunPaths.for_recipe(run, out), use_best=not final_experts)


@app.command("demo")
def demo(
    out: Annotated[Path | None, typer.Option(help="Run folder (default: runs/demo).")] = None,
    threads: Annotated[
        int,
        typer.Option(
            help="CPU threads for torch (0: torch's default). The demo's model is small: one thread is about as fast, and "
            "stays fast when another program keeps a core busy."
        ),
    ] = 1,
    set_: SetOption = None,
) -> None:
    """SELMA on the shapes world (recipes/runs/demo.toml): the toy base toy:shapes, three toy skills, exact
    scores; offline, no API key, minutes on a CPU. `selma run tiny-demo` runs every stage on the random tiny model."""
    from selma_toolkit.paths import RunPaths
    from selma_toolkit.recipe import load_run_recipe

    run = load_run_recipe("demo", set_ or [])
    if threads > 0:
        import torch

        # Measured on a shared 2-core machine with one core busy elsewhere: 48 s with one thread,
        # 10.5 min with torch's default two (their spin-waiting threads fight the other program).
        torch.set_num_threads(threads)
    _run_recipe(run, RunPaths.for_recipe(run, out), use_best=True)


@app.command("status")
def status(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (holds recipe.toml).")],
    final_experts: Annotated[
        bool, typer.Option("--final-experts", help="As `selma run --final-experts` would merge.")
    ] = False,
) -> None:
    """Show what a run folder holds: each stage per skill, done or not, with counts."""
    from selma_toolkit.recipe import load_run_folder
    from selma_toolkit.run import run_status

    run, paths = load_run_folder(run_dir)
    states = run_status(run, paths, use_best=not final_experts)
    console.print(
        f"run {escape(run.name)} in {escape(str(paths.root))} (base model {escape(run.base_model)})",
        highlight=False,
        soft_wrap=True,
    )
    for state in states:
        console.print(stage_line(state), highlight=False, soft_wrap=True)
    finished = sum(state.done for state in states)
    console.print(f"{finished}/{len(states)} stages done" + ("" if finished < len(states) else "; the run is complete"))


def _evaluate_run_folder(run_dir: Path, checkpoints: bool, final_experts: bool) -> None:
    from selma_toolkit.recipe import load_run_folder
    from selma_toolkit.run import evaluate_run

    run, paths = load_run_folder(run_dir)
    if checkpoints:
        from rich.table import Table

        from selma_toolkit.evaluate.checkpoints import select_checkpoints

        choices = run_with_progress(
            lambda on_stage, progress: select_checkpoints(
                run, paths, progress=lambda done, total: progress("checkpoint images", done, total)
            )
        )
        table = Table(
            "skill", "checkpoint steps (mean)", "best", "expert", title="checkpoint selection (held-out prompts)"
        )
        for skill, choice in choices.items():
            means = ", ".join(
                f"{step}: {'-' if mean is None else f'{mean:.4g}'}" for step, mean in choice.means.items()
            )
            table.add_row(escape(skill), f"{choice.metric} {means}", str(choice.step), escape(str(choice.expert)))
        console.print(table)
        return
    index = run_with_progress(
        lambda on_stage, progress: evaluate_run(run, paths, use_best=not final_experts, progress=progress)
    )
    console.print(f"scores: {escape(str(paths.eval_dir / 'scores.json'))}", highlight=False, soft_wrap=True)
    _print_verdicts(paths)
    console.print(f"report: {escape(str(index))}", highlight=False, soft_wrap=True)


def _run_benchmark(run_dir: Path, name: str, final_experts: bool) -> None:
    from selma_toolkit.evaluate.benchmark_run import BENCHMARK_RECORD, benchmark_dir
    from selma_toolkit.evaluate.benchmarks import get_benchmark
    from selma_toolkit.recipe import load_run_folder
    from selma_toolkit.run import benchmark_run

    get_benchmark(name)  # an unknown name is refused before the run folder is read
    run, paths = load_run_folder(run_dir)
    record = run_with_progress(
        lambda on_stage, progress: benchmark_run(run, paths, name, use_best=not final_experts, progress=progress)
    )
    console.print(
        f"{escape(record['title'])}: {record['prompts']['used']} of {record['prompts']['total']} prompts, "
        f"seeds {record['seeds']}, judge {escape(record['judge']['model'])}",
        highlight=False,
        soft_wrap=True,
    )
    for variant, result in record["results"].items():
        overall = result["overall"]
        sources = ", ".join(f"{source} {stats['mean']:.1f}" for source, stats in result["sources"].items() if stats)
        line = (
            "no score"
            if overall is None
            else (f"{overall['mean']:.2f} [{overall['low']:.2f}, {overall['high']:.2f}] over {overall['n']} prompts")
        )
        console.print(
            f"  {escape(variant)}: {line}" + (f"; {escape(sources)}" if len(result["sources"]) > 1 else ""),
            highlight=False,
            soft_wrap=True,
        )
    console.print(escape(record["comparability"]), highlight=False, soft_wrap=True)
    console.print(
        f"licence: {escape(record['licence'])}; cite: {escape(record['citation'])}", highlight=False, soft_wrap=True
    )
    folder = benchmark_dir(paths, name)
    console.print(f"benchmark: {escape(str(folder / BENCHMARK_RECORD))}", highlight=False, soft_wrap=True)
    console.print(f"report: {escape(str(folder / 'report' / 'index.html'))}", highlight=False, soft_wrap=True)


def _compare_before_after(run_dir: Path, before: str, method: str | None) -> None:
    from rich.table import Table

    from selma_toolkit.evaluate.before_after import compare_before_after, verdict_line
    from selma_toolkit.recipe import load_run_folder

    run, paths = load_run_folder(run_dir)
    result = run_with_progress(
        lambda on_stage, progress: compare_before_after(
            run, paths, before, method=method, progress=lambda done, total: progress("before/after images", done, total)
        )
    )
    table = Table(
        "skill",
        "kind",
        "metric",
        "before",
        "after",
        "change [95% interval]",
        "verdict",
        title="merged LoRA before and after adding the new skill(s)",
    )
    for c in result.changes:
        table.add_row(
            escape(c.skill),
            c.kind,
            c.metric,
            f"{c.before:.4g}",
            f"{c.after:.4g}",
            f"{c.change.mean:+.4g} [{c.change.low:+.4g}, {c.change.high:+.4g}]",
            c.verdict,
        )
    console.print(table)
    for verdict in ("gained", "lost"):
        console.print(escape(verdict_line(result.changes, verdict)), highlight=False, soft_wrap=True)  # type: ignore[arg-type]
    console.print(f"comparison: {escape(str(result.folder / 'comparison.md'))}", highlight=False, soft_wrap=True)
    console.print(f"before/after report: {escape(str(result.report))}", highlight=False, soft_wrap=True)
