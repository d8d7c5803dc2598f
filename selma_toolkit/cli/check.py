"""`selma check-base`: before training, whether a recipe's self-generated images can teach its base."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from selma_toolkit.cli.app import (
    SetOption,
    app,
    console,
    run_with_progress,
    set_threads,
)


@app.command("check-base")
def check_base(
    recipe: Annotated[str, typer.Argument(help="Run recipe (file or shipped name).")],
    out: Annotated[
        Path, typer.Option(help="Folder for the check's images, scores, check.json and check.md; rerun to resume.")
    ] = Path("runs/check-base"),
    prompts_per_skill: Annotated[int, typer.Option(help="Train prompts drawn per skill.")] = 16,
    guidance: Annotated[
        list[float] | None,
        typer.Option(
            help="Guidance scales to try besides the recipe's (repeatable; default 1 and 1/2, 2, 4 times the recipe's)."
        ),
    ] = None,
    best_of: Annotated[
        list[int] | None,
        typer.Option(
            help="Best-of-N candidate counts to try with the recipe's images.judge (repeatable; default 4 and 8)."
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice).")] = None,
    set_: SetOption = None,
) -> None:
    """Are the training images this recipe would make more faithful than its base at inference? Draws a
    few images per skill at the recipe's settings and at other guidances / best-of-N with its judge,
    scores them with its scorers, and says which setting (if any) makes them so."""
    from selma_toolkit.check_base import check_base as run_check
    from selma_toolkit.recipe import load_run_recipe

    set_threads(threads)
    run = load_run_recipe(recipe, set_ or [])
    result = run_with_progress(
        lambda on_stage, progress: run_check(
            run,
            out,
            prompts_per_skill=prompts_per_skill,
            guidances=guidance,
            best_of=best_of,
            progress=lambda label, done, total: progress(label, done, total),
        )
    )
    for row in result["settings"]:
        margin = row.get("margin")
        shown = f"{margin['mean']:+.2f} [{margin['low']:+.2f}, {margin['high']:+.2f}]" if margin else "(the reference)"
        console.print(
            f"{escape(row['setting'])}: {escape(row['description'])}; margin {shown}", highlight=False, soft_wrap=True
        )
    console.print(f"[bold]{escape(result['verdict'])}[/bold]", highlight=False, soft_wrap=True)
    console.print(escape(result["advice"]), highlight=False, soft_wrap=True)
    console.print(f"details: {escape(str(out / 'check.md'))}", highlight=False, soft_wrap=True)
