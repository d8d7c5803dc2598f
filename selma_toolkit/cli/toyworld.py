"""`selma toyworld ...`: the shapes world (selma_toolkit/toyworld)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from selma_toolkit.cli.app import SelmaTyper, SetOption, app, console, err_console, run_with_progress, set_threads
from selma_toolkit.errors import InputError

# -------------------------------------------------------------------------------------- toyworld
# The shapes world (selma_toolkit/toyworld): ground-truth renders, the toy base model `toy:shapes`, the study.

toyworld_app = SelmaTyper(
    help="The shapes world: exact faithfulness scores, the toy base model, the SELMA study.", no_args_is_help=True
)
app.add_typer(toyworld_app, name="toyworld")


@toyworld_app.command("render")
def toyworld_render(
    caption: Annotated[str, typer.Argument(help='A shapes-world caption, e.g. "two red circles and a blue square".')],
    out: Annotated[Path, typer.Option(help="PNG file to write.")] = Path("render.png"),
    seed: Annotated[int, typer.Option(help="Placement seed.")] = 0,
    scale: Annotated[int, typer.Option(min=1, max=32, help="Upscale factor (nearest neighbour) for viewing.")] = 1,
) -> None:
    """Draw the ground-truth 32x32 image of a caption; print its questions and their answers on it."""
    from selma_toolkit.toyworld.renderer import render_caption
    from selma_toolkit.toyworld.scorer import answer_questions, caption_questions, segment
    from selma_toolkit.toyworld.world import CaptionError, parse_caption

    try:
        scene = parse_caption(caption)
    except CaptionError as exc:
        raise InputError(
            f"{exc}; see `selma toyworld --help` and selma_toolkit/toyworld/world.py for the grammar"
        ) from None
    image = render_caption(caption, seed)
    answers = answer_questions(scene, segment(image))
    for question in caption_questions(scene):
        console.print(f"{question.id}. {question.text} -> {answers[question.id]}", highlight=False)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), 0)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out)
    console.print(f"wrote {escape(str(out))}", highlight=False)


@toyworld_app.command("score")
def toyworld_score(
    image: Annotated[Path, typer.Argument(help="An image of the shapes world (32x32 RGB).")],
    caption: Annotated[str, typer.Argument(help="Its caption.")],
) -> None:
    """Answer a caption's DSG-style questions on an image by segmentation; print the score (0-100)."""
    from PIL import Image

    from selma_toolkit.toyworld.scorer import answer_questions, caption_questions, score_image, segment
    from selma_toolkit.toyworld.world import CaptionError, parse_caption

    try:
        scene = parse_caption(caption)
    except CaptionError as exc:
        raise InputError(str(exc)) from None
    if not image.is_file():
        raise InputError(f"{image}: no such image file")
    with Image.open(image) as opened:
        picture = opened.convert("RGB")
    answers = answer_questions(scene, segment(picture))
    for question in caption_questions(scene):
        console.print(f"{question.id}. {question.text} -> {answers[question.id]}", highlight=False)
    console.print(f"score {score_image(picture, caption):.1f}")


def _training_columns(description: str) -> tuple:
    """A training loop's progress columns: what it is, the bar, steps done of all, time, the loss."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    return (
        TextColumn(description),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
    )


@toyworld_app.command("pretrain")
def toyworld_pretrain(
    out: Annotated[Path, typer.Option(help="Pretraining folder (checkpoint, snapshots, logs); rerun to resume.")],
    seed: Annotated[int, typer.Option(help="The run is a pure function of the settings and this seed.")] = 0,
    steps: Annotated[
        int, typer.Option(help="UNet + text-encoder steps (a shorter run is a prefix of a longer one).")
    ] = 8000,
    vae_steps: Annotated[int, typer.Option(help="VAE steps (stage 1).")] = 600,
    batch_size: Annotated[int, typer.Option(help="UNet batch size.")] = 64,
    learning_rate: Annotated[
        float, typer.Option(help="UNet + text-encoder learning rate (constant after warm-up).")
    ] = 5e-4,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint and EMA snapshot every N steps.")] = 500,
    eval_every: Annotated[
        int, typer.Option(help="Score the EMA snapshot on held-out prompts every N steps (0: never).")
    ] = 500,
    captions: Annotated[
        str,
        typer.Option(
            help="What the model reads for each render: 'explicit' (the grammar caption: "
            "toy:shapes) or 'web' (a web-like partial caption: toy:shapes-web)."
        ),
    ] = "explicit",
    vae_from: Annotated[
        str | None, typer.Option(help="Use this pipeline's VAE (a folder or toy:shapes) and skip stage 1.")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            help="torch CPU threads (default: torch's choice). Results depend slightly on it (floating-point sums)."
        ),
    ] = None,
) -> None:
    """Pretrain a toy base model on ground-truth renders (VAE, then UNet + text encoder with EMA)."""
    from rich.progress import Progress

    from selma_toolkit.toyworld.pretrain import PretrainSettings, pretrain

    set_threads(threads)
    settings = PretrainSettings(
        seed=seed,
        steps=steps,
        vae_steps=vae_steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        checkpoint_every=checkpoint_every,
        eval_every=eval_every,
        captions=captions,
        vae_from=vae_from,
    )
    with Progress(*_training_columns("{task.description}"), console=err_console) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int, loss: float) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total, loss=loss)
            bar.update(tasks[stage], completed=done, loss=loss)

        snapshot = pretrain(out, settings, progress=progress)
    console.print(
        f"latest EMA snapshot: {escape(str(snapshot))}; export it with "
        f"`selma toyworld export {escape(str(out))} --to FOLDER`",
        highlight=False,
        soft_wrap=True,
    )


@toyworld_app.command("study")
def toyworld_study(
    recipe: Annotated[str, typer.Argument(help="Run recipe (file or shipped name), e.g. toy-study.")] = "toy-study",
    out: Annotated[Path, typer.Option(help="Study folder; rerun to resume.")] = Path("runs/toy-study"),
    seed: Annotated[
        list[int] | None,
        typer.Option(
            help="Run only these replicate seeds (repeatable; default: evaluate.seeds). The summary covers every finished one."
        ),
    ] = None,
    kind: Annotated[
        list[str] | None,
        typer.Option(
            help="Data kinds to train experts on (repeatable): selma, gt, filtered, keyq, bon4, bon8 (best of N by "
            "images.judge), lowcfg, highcfg, teacher, round2 (drawn with round 1's merge), and the Table 4 baselines "
            "dpo, moe ([dpo] / [moe] settings). Default: selma, gt, filtered, keyq, lowcfg, highcfg, and teacher "
            "when --teacher is given."
        ),
    ] = None,
    merge_kind: Annotated[
        list[str] | None,
        typer.Option(
            help="Kinds whose experts are also merged and trained as one mixture LoRA (repeatable; default: selma)."
        ),
    ] = None,
    prompt_set: Annotated[
        str,
        typer.Option(
            help="Where variants are scored: heldout (the measurement) or dev (a development prompt stream, neither "
            "trained on nor held out, for sizing a study)."
        ),
    ] = "heldout",
    guidance: Annotated[
        list[float] | None,
        typer.Option(help="Other guidance scales to draw the base at, variants base-cfg<g> (repeatable; default: 1)."),
    ] = None,
    teacher: Annotated[
        str | None,
        typer.Option(help="Weak-to-strong: the base model that draws the 'teacher' kind's images (e.g. toy:shapes)."),
    ] = None,
    high_guidance: Annotated[float, typer.Option(min=1, help="Guidance of the 'highcfg' kind's images.")] = 8.0,
    filter_min_score: Annotated[
        float,
        typer.Option(min=0, max=100, help="Filtered experts train on self-generated images scoring at least this."),
    ] = 100.0,
    filter_candidates: Annotated[
        int,
        typer.Option(
            min=1, help="Self-generated candidates per prompt for the filtered experts (the first that passes is kept)."
        ),
    ] = 4,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice).")] = None,
    set_: SetOption = None,
) -> None:
    """SELMA on a toy base, scored exactly: base, experts on self-generated / ground-truth / filtered /
    judged / other-guidance / teacher / second-round images, the mixture LoRA and the merges, per seed;
    then study.md, study.json and study.png."""
    from selma_toolkit.recipe import load_run_recipe
    from selma_toolkit.toyworld.study import StudyOptions, run_study
    from selma_toolkit.toyworld.study_kinds import DEFAULT_KINDS

    if prompt_set not in ("heldout", "dev"):
        raise InputError(f"--prompt-set {prompt_set!r}: expected heldout or dev")
    set_threads(threads)
    run = load_run_recipe(recipe, set_ or [])
    kinds = kind or [*DEFAULT_KINDS, *(["teacher"] if teacher else [])]
    options = StudyOptions(
        kinds=tuple(kinds),
        merge_kinds=tuple(merge_kind or ("selma",)),
        prompt_set=prompt_set,  # type: ignore[arg-type]
        guidances=tuple(guidance or (1.0,)),
        filter_min_score=filter_min_score,
        filter_candidates=filter_candidates,
        high_guidance=high_guidance,
        teacher=teacher,
    )
    summary = run_with_progress(lambda on_stage, progress: run_study(run, out, options, seeds=seed, progress=progress))
    console.print(f"study summary: {escape(str(summary))}", highlight=False, soft_wrap=True)
    console.print(f"per-seed reports: {escape(str(out))}/seed-*/report/index.html", highlight=False, soft_wrap=True)


@toyworld_app.command("export")
def toyworld_export(
    run_dir: Annotated[Path, typer.Argument(help="A pretraining folder.")],
    to: Annotated[
        Path, typer.Option(help="Diffusers folder to write (replaced whole), e.g. selma_toolkit/toyworld/base.")
    ],
    step: Annotated[int | None, typer.Option(help="Snapshot step (default: the latest).")] = None,
) -> None:
    """Write an EMA snapshot of a pretraining run as a diffusers pipeline folder (fp16 safetensors)."""
    from selma_toolkit.toyworld.snapshots import export_base, snapshot_path

    target = export_base(run_dir, snapshot_path(run_dir, step), to)
    console.print(f"wrote {escape(str(target))}", highlight=False)


@toyworld_app.command("judge-train")
def toyworld_judge_train(
    out: Annotated[Path, typer.Option(help="Training folder (checkpoint, log); rerun to resume.")],
    seed: Annotated[int, typer.Option(help="The run is a pure function of the settings and this seed.")] = 0,
    steps: Annotated[int, typer.Option(help="Training steps.")] = 3000,
    batch_size: Annotated[
        int, typer.Option(help="Renders per step (each with its caption and 3 hard negatives).")
    ] = 64,
    learning_rate: Annotated[float, typer.Option(help="AdamW learning rate (constant after warm-up).")] = 5e-4,
    warmup_steps: Annotated[int, typer.Option(help="Linear warm-up steps.")] = 100,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = 500,
    noise: Annotated[float, typer.Option(help="Largest pixel-noise std of the degraded renders.")] = 0.1,
    blur: Annotated[float, typer.Option(help="Share of renders blurred (3x3 box).")] = 0.5,
    exclude_recipe: Annotated[
        str | None,
        typer.Option(
            help="A study recipe whose held-out and development prompts the judge must never see (e.g. toy-study-3)."
        ),
    ] = None,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default: torch's choice).")] = None,
) -> None:
    """Train toy:judge, a small CLIP of the shapes world, on renders with hard-negative captions."""
    from rich.progress import Progress

    from selma_toolkit.toyworld.judge import JudgeSettings, train_judge

    set_threads(threads)
    settings = JudgeSettings(
        seed=seed,
        steps=steps,
        batch_size=batch_size,
        learning_rate=learning_rate,
        warmup_steps=warmup_steps,
        checkpoint_every=checkpoint_every,
        noise=noise,
        blur=blur,
        exclude_recipe=exclude_recipe,
    )
    with Progress(*_training_columns("judge"), console=err_console) as bar:
        task = bar.add_task("judge", total=steps, loss=0.0)
        train_judge(out, settings, progress=lambda done, total, loss: bar.update(task, completed=done, loss=loss))
    console.print(f"export it with `selma toyworld judge-export {escape(str(out))}`", highlight=False, soft_wrap=True)


@toyworld_app.command("judge-export")
def toyworld_judge_export(
    run_dir: Annotated[Path, typer.Argument(help="A judge training folder.")],
    to: Annotated[
        Path | None,
        typer.Option(
            help="Folder to write (replaced whole); default: the shipped selma_toolkit/toyworld/judge (toy:judge)."
        ),
    ] = None,
) -> None:
    """Write a trained judge as a transformers CLIP folder (fp16 safetensors, processor, provenance)."""
    from selma_toolkit.toyworld.judge import JUDGE_DIR, export_judge

    target = export_judge(run_dir, to or JUDGE_DIR)
    console.print(f"wrote {escape(str(target))}", highlight=False)
