"""The four stages, one command each: `selma prompts`, `selma images`, `selma train`, `selma merge`."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from selma_toolkit.cli.app import FORMAT_HELP, SetOption, app, console, err_console, quiet_loading_bars
from selma_toolkit.config import merge_methods as merging  # the merge method table (no torch): --method help
from selma_toolkit.errors import InputError

# --------------------------------------------------------------------------------------- prompts


@app.command("prompts")
def prompts(
    recipe: Annotated[str, typer.Argument(help="Run recipe (all its skills) or skill recipe: file or shipped name.")],
    skill: Annotated[str | None, typer.Option(help="Only this skill of a run recipe.")] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Run folder (run recipe; default output_dir, else runs/<name>) "
            "or output folder (skill recipe; default runs/<skill>)."
        ),
    ] = None,
    set_: SetOption = None,
) -> None:
    """Stage 1: each skill's prompts from its LLM endpoint (or offline grammar) into prompts.jsonl.

    A run recipe also asks for evaluate.prompts_per_skill held-out prompts per skill. A stopped run
    continues where it stopped; answers are cached, so a rerun costs nothing.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from selma_toolkit.paths import RunPaths
    from selma_toolkit.prompts import generate_prompts
    from selma_toolkit.recipe import RunRecipe, load_recipe, write_resolved_recipe

    loaded = load_recipe(recipe, set_ or [])
    if isinstance(loaded, RunRecipe):
        paths = RunPaths.for_recipe(loaded, out)
        chosen = [loaded.skill(skill)] if skill else loaded.skills
        jobs = [(s, paths.prompts(s.name), loaded.evaluate.prompts_per_skill) for s in chosen]
        write_resolved_recipe(loaded, paths.root)
    else:
        if skill and skill != loaded.name:
            raise InputError(
                f"--skill {skill!r}: {recipe} is the skill recipe {loaded.name!r}; drop --skill or pass a run recipe"
            )
        folder = out or Path("runs") / loaded.name
        jobs = [(loaded, folder / "prompts.jsonl", 0)]
        write_resolved_recipe(loaded, folder)
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("httpx2").setLevel(logging.WARNING)  # one line per request would tear up the bar
        logging.getLogger("httpx").setLevel(logging.WARNING)
    results = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console) as bar:
        for skill_recipe, path, heldout in jobs:
            task = bar.add_task(skill_recipe.name, total=skill_recipe.num_prompts + heldout)

            def show(stats, task=task) -> None:
                calls = f"{stats.requests} requests, {stats.cache_hits} cached, " if stats.source == "llm" else ""
                bar.update(
                    task,
                    completed=stats.kept,
                    description=f"{stats.skill}: {calls}{sum(stats.rejected.values())} rejected",
                )

            results.append(generate_prompts(skill_recipe, path, heldout, progress=show))
    _print_prompt_summary(results)


def _print_prompt_summary(results) -> None:
    from rich.table import Table

    table = Table("skill", "kept", "new", "requests", "cached", "tokens", "rejected", title="prompts")
    for stats in results:
        rejected = ", ".join(f"{reason} {count}" for reason, count in stats.rejected.items() if count) or "-"
        table.add_row(
            stats.skill,
            f"{stats.kept}/{stats.target}",
            str(stats.added),
            str(stats.requests),
            str(stats.cache_hits),
            str(stats.total_tokens),
            rejected,
        )
    console.print(table)
    for stats in results:
        console.print(f"{stats.skill}: {stats.path}", soft_wrap=True, highlight=False)


# ---------------------------------------------------------------------------------------- images


@app.command("images")
def images(
    recipe: Annotated[str, typer.Argument(help="Run recipe file or shipped name.")],
    skill: Annotated[str | None, typer.Option(help="Only this skill (default: every skill of the run).")] = None,
    out: Annotated[
        Path | None, typer.Option(help="Run folder (default: the recipe's output_dir, else runs/<name>).")
    ] = None,
    set_: SetOption = None,
) -> None:
    """Stage 2: draw one image per train prompt into each skill's image dataset (resumes a stopped run).

    Several GPUs (or CPU processes) share the prompts with
    `accelerate launch --multi_gpu --num_processes N -m selma_toolkit images RECIPE` or
    `torchrun --nproc_per_node N -m selma_toolkit images RECIPE`.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from selma_toolkit.images import check_image_inputs, generate_images, process_state
    from selma_toolkit.images.shard import finish
    from selma_toolkit.paths import RunPaths
    from selma_toolkit.recipe import load_run_recipe

    run = load_run_recipe(recipe, set_ or [])
    paths = RunPaths.for_recipe(run, out)
    names = [run.skill(skill).name] if skill else [s.name for s in run.skills]
    if not names:
        raise InputError(f"{recipe}: the run has no skills, so there are no prompts to draw images for")
    for name in names:  # every skill's input, before hours are spent drawing the first one
        check_image_inputs(run, name, paths)
    quiet_loading_bars()
    state = process_state()
    share = f" (process {state.process_index + 1} of {state.num_processes})" if state.num_processes > 1 else ""
    results = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        _rate_column(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console, disable=not state.is_main_process) as bar:
        for name in names:
            task = bar.add_task(f"{name}{share}", total=None)
            results.append(
                generate_images(
                    run,
                    name,
                    paths,
                    progress=lambda done, total, task=task: bar.update(task, completed=done, total=total),
                )
            )
    finish(state)
    if state.is_main_process:
        _print_image_summary(results, state.num_processes)


def _rate_column():
    """A progress column with images per second (rich's own speed columns print bytes)."""
    from rich.progress import ProgressColumn
    from rich.text import Text

    class RateColumn(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.2f} img/s" if speed else "- img/s")

    return RateColumn()


def _print_image_summary(results, num_processes: int) -> None:
    from rich.table import Table

    table = Table(title="images")
    for column in ("skill", "train prompts", "in dataset", "drawn now", "already there", "blacked out", "img/s"):
        table.add_column(column)
    for stats in results:
        table.add_row(
            stats.skill,
            str(stats.prompts),
            str(stats.images),
            str(stats.generated),
            str(stats.skipped),
            str(len(stats.blacked_out)),
            f"{stats.images_per_second:.2f}",
        )
    console.print(table)
    for stats in results:
        per_process = f"; drawn per process: {stats.per_process}" if num_processes > 1 else ""
        console.print(f"{stats.skill}: dataset in {stats.folder}{per_process}", soft_wrap=True)


# ----------------------------------------------------------------------------------------- train


@app.command("train")
def train(
    recipe: Annotated[str, typer.Argument(help="Run recipe file or shipped name.")],
    skill: Annotated[str | None, typer.Option(help="Train the expert of this skill.")] = None,
    joint: Annotated[
        bool, typer.Option("--joint", help="One LoRA on the mixture of all skills (the paper's baseline).")
    ] = False,
    moe: Annotated[
        bool,
        typer.Option(
            "--moe",
            help="MoE-LoRA (paper Table 4): a gate over the trained experts, kept frozen, on the mixture; [moe] settings.",
        ),
    ] = False,
    dpo: Annotated[
        bool,
        typer.Option(
            "--dpo",
            help="DPO variant (paper Table 4): each skill's Diffusion-DPO expert on scored pairs of base images, then merged (with --skill: that skill's); [dpo] settings.",
        ),
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="Run folder (default: the recipe's output_dir, else runs/<name>).")
    ] = None,
    set_: SetOption = None,
) -> None:
    """Stage 3: train a LoRA skill expert; run again, it resumes from the latest checkpoint.

    Several GPUs split each batch with
    `accelerate launch --multi_gpu --num_processes N -m selma_toolkit train RECIPE --skill NAME`
    (or `torchrun --nproc_per_node N -m selma_toolkit train ...`, also on CPUs): the same samples
    and noise whatever the number of processes, so the same expert up to float rounding.
    """
    modes = joint + moe + dpo
    if modes > 1 or (modes == 0 and skill is None) or ((joint or moe) and skill is not None):
        raise InputError(
            "train: give one of --skill NAME (one expert), --joint (the mixture baseline), --moe (the MoE-LoRA "
            "gate over the trained experts) or --dpo [--skill NAME] (the DPO experts and their merge)"
        )
    import torch
    from accelerate import PartialState
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from selma_toolkit.paths import JOINT, RunPaths
    from selma_toolkit.recipe import load_run_recipe
    from selma_toolkit.train import TrainEvent, train_expert

    run = load_run_recipe(recipe, set_ or [])
    paths = RunPaths.for_recipe(run, out)
    name = JOINT if joint else "moe" if moe else run.skill(skill).name if skill else "dpo"
    quiet_loading_bars()
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("accelerate").setLevel(logging.WARNING)  # else a line per file of every checkpoint
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[loss]}"),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
    )
    # The same process group train_expert's Accelerator joins (gloo on a CPU machine).
    is_main = PartialState(cpu=not torch.cuda.is_available()).is_main_process
    with Progress(*columns, console=err_console, disable=not is_main) as bar:
        tasks: dict[str, int] = {}
        rate = {"seconds": None}

        def show(event: TrainEvent) -> None:
            if event.kind not in tasks:
                label = f"{name}: encoding cache" if event.kind == "cache" else f"{name}: training"
                tasks[event.kind] = bar.add_task(label, total=event.total, loss="", rate="")
            fields = {}
            if event.kind == "step":
                # Smoothed over about ten steps: single steps stall now and then on shared machines.
                previous = rate["seconds"]
                rate["seconds"] = event.seconds if previous is None else 0.9 * previous + 0.1 * event.seconds
                fields = {"loss": f"loss {event.loss:.4f}", "rate": f"{1 / max(rate['seconds'], 1e-9):.2f} it/s"}
            bar.update(tasks[event.kind], completed=event.done, total=event.total, **fields)

        if moe:
            expert = _train_moe(run, paths, show)
        elif dpo:
            from selma_toolkit.train.dpo import train_dpo, train_dpo_expert

            expert = (
                train_dpo_expert(run, name, paths, progress=show)
                if skill
                else train_dpo(run, paths, progress=lambda _skill, event: show(event))
            )
        else:
            expert = train_expert(run, name, paths, progress=show)
    if is_main:
        console.print(f"{name}: expert written to {expert}", soft_wrap=True, highlight=False)


def _train_moe(run, paths, show):
    """The MoE-LoRA gate over the experts `selma run` would merge (best checkpoints where selected)."""
    from selma_toolkit.run_checks import resolve_external_experts
    from selma_toolkit.stages import merge_inputs
    from selma_toolkit.train.moe import train_moe

    experts = merge_inputs(run, paths, resolve_external_experts(run))
    missing = [name for name, path in experts if not path.is_file()]
    if missing:
        raise InputError(
            f"train --moe: no expert yet for {', '.join(missing)}; train them first "
            "(`selma train RECIPE --skill NAME`, or `selma run RECIPE`)"
        )
    return train_moe(run, paths, experts, progress=show)


# ----------------------------------------------------------------------------------------- merge


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise InputError(
            f"--weights {text!r}: expected comma-separated numbers, one per expert, e.g. 0.2,0.8"
        ) from None


def _file_size(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


@app.command("merge")
def merge(
    experts: Annotated[
        list[str] | None, typer.Argument(help="Expert LoRAs: .safetensors files, catalog names or Hub repo ids.")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="The merged .safetensors file to write (with --to: default MERGED itself)."),
    ] = None,
    method: Annotated[str | None, typer.Option(help=merging.method_help())] = None,
    weights: Annotated[
        str | None, typer.Option(help="One weight per expert, comma-separated (e.g. 0.2,0.8); default 1/T each.")
    ] = None,
    rank: Annotated[int | None, typer.Option(help=merging.rank_help())] = None,
    format_: Annotated[str | None, typer.Option("--format", help=FORMAT_HELP)] = None,
    density: Annotated[float | None, typer.Option(help=merging.density_help())] = None,
    seed: Annotated[int | None, typer.Option(help=merging.seed_help())] = None,
    svd_mode: Annotated[str | None, typer.Option("--svd-mode", help=merging.svd_mode_help())] = None,
    normalize: Annotated[bool, typer.Option(help="Divide the weights by their sum.")] = False,
    add: Annotated[
        list[str] | None,
        typer.Option("--add", help="With --to: an expert to add (file, catalog name or repo id; repeatable)."),
    ] = None,
    to: Annotated[
        Path | None,
        typer.Option("--to", help="A merged LoRA whose metadata lists its experts: add the --add experts to it."),
    ] = None,
    expert_file: Annotated[
        list[Path] | None,
        typer.Option(
            "--expert",
            help="With --to: a file of one of MERGED's experts, if it moved (matched by sha256; repeatable).",
        ),
    ] = None,
    block_weights: Annotated[
        str | None,
        typer.Option(
            "--block-weights",
            help="Per-block weights GROUP=W,... (groups: unet, in, in.N, mid, out, out.N, te, te1, te2), e.g. in=1,mid=0.5,out=1,te=0: each merged module's update times its group's weight.",
        ),
    ] = None,
) -> None:
    """Merge several LoRA experts into one LoRA file, or add experts to a merged one (--add NEW --to MERGED).

    --add/--to computes exactly the merge of MERGED's experts (found by the sha256 its metadata
    records: at their recorded paths, beside MERGED, in its run folder, via the Hub) plus the new
    ones, with MERGED's method and settings. Where an expert is missing, a selma or delta merge with
    uniform weights is updated exactly from MERGED's own factors; other merges are refused.
    """
    from selma_toolkit.experts import listed_expert_places, resolve_expert_files
    from selma_toolkit.io import check_output_file
    from selma_toolkit.lora.blocks import parse_block_weights
    from selma_toolkit.lora.merge import MERGE_METHODS, merge_files

    if to is not None or add:
        from selma_toolkit.lora.incremental import add_to_merge

        if to is None or not add:
            raise InputError(
                "--add and --to go together: selma merge --add NEW.safetensors --to MERGED.safetensors [--out FILE]"
            )
        if experts:
            raise InputError(
                f"{experts[0]}: with --to, the old experts come from {to}'s metadata; give new ones with --add (repeatable)"
            )
        given = (
            ("--method", method),
            ("--rank", rank),
            ("--density", density),
            ("--seed", seed),
            ("--svd-mode", svd_mode),
            ("--block-weights", block_weights),
        )
        fixed = [name for name, value in given if value is not None] + (["--normalize"] if normalize else [])
        if fixed:
            raise InputError(
                f"{', '.join(fixed)}: adding to {to} keeps its merge settings (recorded in its metadata); to "
                "change them, merge the experts from scratch: selma merge EXPERT... --out FILE"
            )
        check_output_file(out if out is not None else to)
        added = resolve_expert_files(add)
        result = add_to_merge(
            to,
            [e.path for e in added],
            out,
            weights=_parse_weights(weights),
            expert_files=expert_file or [],
            new_sources=[e.source for e in added],
            format=format_,
            locate=listed_expert_places,
        )  # type: ignore[arg-type]
        how = (
            "every listed expert found and verified: merged again from the files"
            if result.recomputed
            else "some listed experts not found: the merged factors were updated exactly (linear merge rule)"
        )
        _print_merge(result.weights, result.path, f"added {len(add)} expert(s) to {to.name}")
        console.print(how, highlight=False, soft_wrap=True)
        return
    if not experts or out is None:
        raise InputError(
            "selma merge: give the experts and --out FILE (or --add NEW --to MERGED to add experts to a merge)"
        )
    if expert_file:
        raise InputError("--expert helps find the experts of a merged file and goes with --to MERGED")
    method = method or "selma"
    if method not in MERGE_METHODS:
        raise InputError(f"--method {method!r}: expected one of {', '.join(MERGE_METHODS)}")
    if svd_mode not in (None, *merging.SVD_MODES):
        raise InputError(f"--svd-mode {svd_mode!r}: expected {merging.listing(merging.SVD_MODES)}")
    check_output_file(out)  # before reading any expert: a folder or read-only place in the way fails now
    files = resolve_expert_files(experts)
    merged = merge_files(
        [e.path for e in files],
        out,
        method,
        _parse_weights(weights),
        rank,  # type: ignore[arg-type]
        format=format_,
        density=0.5 if density is None else density,
        seed=seed or 0,  # type: ignore[arg-type]
        normalize=normalize,
        svd_mode=svd_mode or "exact",
        sources=[e.source for e in files],  # type: ignore[arg-type]
        block_weights=parse_block_weights(block_weights),
    )
    _print_merge(merged, out, f"merged {len(files)} experts")


def _print_merge(merged, out: Path, title: str) -> None:
    from rich.table import Table

    from selma_toolkit.lora import inspect_lora
    from selma_toolkit.lora.merge import merge_record

    record = merge_record(merged) or {}
    inputs = Table("expert", "skill", "weight", "sha256", title=escape(title))
    for info, weight in zip(record.get("experts", []), record.get("weights", [])):
        inputs.add_row(escape(info["name"]), escape(info.get("skill") or "-"), f"{weight:.6g}", info["sha256"][:12])
    console.print(inputs)
    summary = Table("modules", "ranks", "method", "layout", "file size", "file")
    ranks = sorted(merged.ranks())
    summary.add_row(
        str(len(merged.modules)),
        ", ".join(map(str, ranks)) if len(ranks) <= 4 else f"{ranks[0]}-{ranks[-1]}",
        record.get("method", "?"),
        ", ".join(inspect_lora(out).layouts),
        _file_size(out.stat().st_size),
        escape(str(out)),
    )
    console.print(summary)
