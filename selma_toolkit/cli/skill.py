"""`selma skill new` and `selma skill propose`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from selma_toolkit.cli.app import SelmaTyper, app, console, run_with_progress

# Teaching one more skill (docs/tutorial-new-skill.md): `selma skill new` (selma_toolkit/skill_new.py)
# and `selma evaluate RUN --before PREVIOUS` (selma_toolkit/evaluate/before_after.py); `selma merge
# --add/--to` is in the merge section.

skill_app = SelmaTyper(
    help="Write new skill recipes: by hand (new), or proposed by a model's failures (propose).", no_args_is_help=True
)
app.add_typer(skill_app, name="skill")


@skill_app.command("new")
def skill_new(
    name: Annotated[str, typer.Argument(help="The new skill's name (lower-case letters, digits, '-', '_').")],
    from_: Annotated[
        str | None,
        typer.Option("--from", help="Start from this skill recipe (shipped name such as coco, or a file)."),
    ] = None,
    source: Annotated[
        str | None,
        typer.Option(help="llm (an OpenAI-compatible endpoint) or grammar (offline); default: --from's, else llm."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="The recipe file to write (default: NAME.toml).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", help="Set a skill field, e.g. --set num_prompts=200 or --set llm.model=gpt-4o-mini (repeatable)."
        ),
    ] = None,
) -> None:
    """Write a new skill recipe, every field explained in a comment, and validate it."""
    from selma_toolkit.skill_new import new_skill_recipe

    made = new_skill_recipe(
        name, out or Path(f"{name}.toml"), source=source, from_skill=from_, overrides=set_ or [], force=force
    )
    console.print(
        f"wrote skill recipe {made.name!r} (source {made.source}) to {escape(str(made.path))}", highlight=False
    )
    if made.unfilled:
        console.print(
            f"fill in: {', '.join(made.unfilled)} (the <fill in: ...> texts), then check it with "
            f"`selma recipe validate {escape(str(made.path))}`",
            highlight=False,
            soft_wrap=True,
        )
    else:
        console.print(
            f'[green]OK[/green]: valid; list it in a run recipe: skills = ["{escape(str(made.path))}"]',
            highlight=False,
            soft_wrap=True,
        )


@skill_app.command("propose")
def skill_propose(
    prompts: Annotated[
        Path, typer.Argument(help="A text file of your own prompts, one a line (blank and # lines skipped).")
    ],
    base: Annotated[str, typer.Option(help="The base model that draws them (Hub id, folder, toy:shapes, tiny:sd1).")],
    out: Annotated[Path, typer.Option(help="A new folder: images, report.json, summary.md, skills/<name>.toml.")],
    scorer: Annotated[
        str,
        typer.Option(
            help="toyworld or questions (grouped by the question kind that fails), or clipscore, "
            "pickscore, hps, imagereward, vqascore (failing prompts clustered)."
        ),
    ] = "toyworld",
    threshold: Annotated[
        float | None,
        typer.Option(
            help="A prompt fails below this mean score (default: 100 for toyworld / questions, else the list's lower quartile)."
        ),
    ] = None,
    images_per_prompt: Annotated[int, typer.Option(help="Images drawn per prompt.")] = 2,
    steps: Annotated[int, typer.Option(help="Denoising steps (the paper: 50).")] = 50,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale (the paper: 7.5).")] = 7.5,
    resolution: Annotated[int | None, typer.Option(help="Image size (default: the model's own).")] = None,
    seed: Annotated[int, typer.Option(help="Base seed of the images.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images per pipeline call.")] = 8,
    min_prompts: Annotated[int, typer.Option(help="Failing prompts a group needs to become a skill (3 or more).")] = 3,
    min_failure_rate: Annotated[
        float, typer.Option(help="Question kinds: the share of the images asking it in which it fails first, at least.")
    ] = 0.25,
    max_skills: Annotated[int, typer.Option(help="Clusters: at most this many.")] = 3,
    source: Annotated[
        str | None,
        typer.Option(
            help="The recipes' prompt source: grammar (toyworld only) or llm; default: grammar for toyworld, else llm."
        ),
    ] = None,
    prefix: Annotated[str, typer.Option(help="Start of each proposed skill's name.")] = "fix-",
    num_prompts: Annotated[
        int | None,
        typer.Option(
            help="Prompts per proposed skill (default: the paper's 1000; a grammar's at most half of what it can make)."
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch (default: torch's).")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Group a finished folder's images again and rewrite its recipes.")
    ] = False,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="A scorer setting of a run recipe's evaluate section, e.g. --set clip_model=tiny:clip or "
            "--set questions=FILE (repeatable).",
        ),
    ] = None,
) -> None:
    """Draw the base model's images for your prompts, score them, and propose one skill recipe per group of
    prompts that fail the same way (its seed prompts are those prompts). List a recipe in a run recipe's skills."""
    from selma_toolkit.cli.app import set_threads
    from selma_toolkit.io import read_json
    from selma_toolkit.skill_propose import DrawSettings, evaluate_settings, propose_skills

    set_threads(threads)
    draw = DrawSettings(
        steps=steps,
        guidance_scale=guidance,
        resolution=resolution,
        seed=seed,
        images_per_prompt=images_per_prompt,
        batch_size=batch_size,
    )
    settings = evaluate_settings(scorer, set_ or [])
    proposed = run_with_progress(
        lambda on_stage, progress: propose_skills(
            prompts,
            base,
            out,
            scorer=scorer,
            threshold=threshold,
            draw=draw,
            evaluate=settings,
            min_prompts=min_prompts,
            min_failure_rate=min_failure_rate,
            max_skills=max_skills,
            source=source,
            prefix=prefix,
            num_prompts=num_prompts,
            force=force,
            progress=lambda done, total: progress("images", done, total),
        )
    )
    report = read_json(out / "report.json", missing="no report written")
    failing = sum(p["failing"] for p in report["prompts"])
    console.print(
        f"{failing} of {len(report['prompts'])} prompts failed (mean {scorer} score below {report['threshold']:.4g})",
        highlight=False,
    )
    for group in report["groups"]:
        rate = (
            ""
            if group["failure_rate"] is None
            else f", fails first in {group['failure_rate']:.0%} of the images asking it"
        )
        lines = ", ".join(map(str, sorted(group["lines"])))
        if group["proposed"]:
            console.print(
                f"[green]proposed[/green] {escape(group['skill'])}: {escape(group['key'])}{rate}; prompts on "
                f"lines {lines} -> {escape(str(out / 'skills' / (group['skill'] + '.toml')))}",
                highlight=False,
                soft_wrap=True,
            )
        else:
            console.print(
                f"not proposed: {escape(group['key'])}{rate}: {escape(group['reason'])}",
                highlight=False,
                soft_wrap=True,
            )
    if not proposed:
        console.print("no skill proposed", highlight=False)
    console.print(
        f"report: {escape(str(out / 'report.json'))}; summary: {escape(str(out / 'summary.md'))}",
        highlight=False,
        soft_wrap=True,
    )
