"""The `selma` command line: parses arguments, loads recipes, calls one library function.

No logic lives here beyond argument handling and printing. Heavy imports (torch, diffusers) happen
inside the commands, so `selma --help` starts fast. A SelmaError prints its message and exits 1
without a traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape

from selma_toolkit import __version__
from selma_toolkit.errors import SelmaError

console = Console()
err_console = Console(stderr=True)

app = typer.Typer(
    name="selma",
    help="SELMA skill experts for text-to-image models: prompts -> images -> LoRA experts -> merge.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
recipe_app = typer.Typer(help="Validate and show recipes.", no_args_is_help=True)
tiny_app = typer.Typer(help="The embedded tiny models (no download needed).", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
app.add_typer(tiny_app, name="tiny")

SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a recipe value, e.g. --set train.steps=100 (repeatable)."),
]


def _version(value: bool) -> None:
    if value:
        console.print(f"selma-toolkit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log debug messages.")] = False,
) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
    )


# ---------------------------------------------------------------------------------------- recipe


@recipe_app.command("validate")
def recipe_validate(
    recipes: Annotated[list[str], typer.Argument(help="Recipe files or shipped names.")],
    set_: SetOption = None,
) -> None:
    """Check recipes; print OK or what is wrong (exit 1)."""
    from selma_toolkit.recipe import RunRecipe, load_recipe

    for ref in recipes:
        recipe = load_recipe(ref, set_ or [])
        kind = "run" if isinstance(recipe, RunRecipe) else "skill"
        extra = f", skills: {', '.join(s.name for s in recipe.skills)}" if isinstance(recipe, RunRecipe) else ""
        console.print(f"[green]OK[/green] {ref}: {kind} recipe {recipe.name!r}{extra}")


@recipe_app.command("show")
def recipe_show(
    recipe: Annotated[str, typer.Argument(help="Recipe file or shipped name.")],
    set_: SetOption = None,
) -> None:
    """Print the fully resolved recipe (defaults filled in, skills inline) as TOML."""
    from selma_toolkit.recipe import load_recipe, recipe_hash, resolved_toml

    loaded = load_recipe(recipe, set_ or [])
    sys.stdout.write(f"# sha256 {recipe_hash(loaded)}\n" + resolved_toml(loaded))


@recipe_app.command("list")
def recipe_list() -> None:
    """List the shipped skill and run recipes."""
    from selma_toolkit.resources import shipped_dir

    root = shipped_dir("recipes")
    for kind in ("skills", "runs"):
        names = sorted(p.stem for p in (root / kind).glob("*.toml"))
        console.print(f"[bold]{kind}[/bold]: {', '.join(names)}")


# ------------------------------------------------------------------------------------------ tiny


@tiny_app.command("create")
def tiny_create(
    out: Annotated[Path, typer.Argument(help="New folder for the model.")],
    arch: Annotated[str, typer.Option(help="sd1, sd2 or sdxl.")] = "sd1",
    seed: Annotated[int, typer.Option(help="Weights seed: the same seed writes the same weights.")] = 0,
) -> None:
    """Write a tiny random text-to-image model in the diffusers folder layout."""
    from selma_toolkit.tiny import ARCHITECTURES, create_tiny_model

    if arch not in ARCHITECTURES:
        raise SelmaError(f"--arch {arch!r}: expected one of {', '.join(ARCHITECTURES)}")
    try:
        path = create_tiny_model(out, arch, seed)  # type: ignore[arg-type]
    except FileExistsError as exc:
        raise SelmaError(str(exc)) from None
    console.print(f"wrote tiny {arch} model to {path} (load it with DiffusionPipeline.from_pretrained)")


# --------------------------------------------------------------------------------------- prompts


@app.command("prompts")
def prompts(
    recipe: Annotated[str, typer.Argument(help="Run recipe (all its skills) or skill recipe: file or shipped name.")],
    skill: Annotated[Optional[str], typer.Option(help="Only this skill of a run recipe.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (run recipe; default output_dir, else runs/<name>) "
                                                     "or output folder (skill recipe; default runs/<skill>).")] = None,
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
            raise SelmaError(f"--skill {skill!r}: {recipe} is the skill recipe {loaded.name!r}; drop --skill or pass a run recipe")
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
                bar.update(task, completed=stats.kept,
                           description=f"{stats.skill}: {calls}{sum(stats.rejected.values())} rejected")

            results.append(generate_prompts(skill_recipe, path, heldout, progress=show))
    _print_prompt_summary(results)


def _print_prompt_summary(results) -> None:
    from rich.table import Table

    table = Table("skill", "kept", "new", "requests", "cached", "tokens", "rejected", title="prompts")
    for stats in results:
        rejected = ", ".join(f"{reason} {count}" for reason, count in stats.rejected.items() if count) or "-"
        table.add_row(stats.skill, f"{stats.kept}/{stats.target}", str(stats.added), str(stats.requests),
                      str(stats.cache_hits), str(stats.total_tokens), rejected)
    console.print(table)
    for stats in results:
        console.print(f"{stats.skill}: {stats.path}", soft_wrap=True, highlight=False)


# ---------------------------------------------------------------------------------------- images


@app.command("images")
def images(
    recipe: Annotated[str, typer.Argument(help="Run recipe file or shipped name.")],
    skill: Annotated[Optional[str], typer.Option(help="Only this skill (default: every skill of the run).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default: the recipe's output_dir, else runs/<name>).")] = None,
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
        raise SelmaError(f"{recipe}: the run has no skills, so there are no prompts to draw images for")
    for name in names:  # every skill's input, before hours are spent drawing the first one
        check_image_inputs(run, name, paths)
    _quiet_loading_bars()
    state = process_state()
    share = f" (process {state.process_index + 1} of {state.num_processes})" if state.num_processes > 1 else ""
    results = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _rate_column(), TimeRemainingColumn())
    with Progress(*columns, console=err_console, disable=not state.is_main_process) as bar:
        for name in names:
            task = bar.add_task(f"{name}{share}", total=None)
            results.append(generate_images(
                run, name, paths, progress=lambda done, total, task=task: bar.update(task, completed=done, total=total)
            ))
    finish(state)
    if state.is_main_process:
        _print_image_summary(results, state.num_processes)


def _quiet_loading_bars() -> None:
    # diffusers and transformers draw a tqdm bar per model load; they would tear up the rich bar.
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()


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
        table.add_row(stats.skill, str(stats.prompts), str(stats.images), str(stats.generated), str(stats.skipped),
                      str(len(stats.blacked_out)), f"{stats.images_per_second:.2f}")
    console.print(table)
    for stats in results:
        per_process = f"; drawn per process: {stats.per_process}" if num_processes > 1 else ""
        console.print(f"{stats.skill}: dataset in {stats.folder}{per_process}", soft_wrap=True)


# ----------------------------------------------------------------------------------------- train


@app.command("train")
def train(
    recipe: Annotated[str, typer.Argument(help="Run recipe file or shipped name.")],
    skill: Annotated[Optional[str], typer.Option(help="Train the expert of this skill.")] = None,
    joint: Annotated[bool, typer.Option("--joint", help="One LoRA on the mixture of all skills (the paper's baseline).")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default: the recipe's output_dir, else runs/<name>).")] = None,
    set_: SetOption = None,
) -> None:
    """Stage 3: train a LoRA skill expert; run again, it resumes from the latest checkpoint.

    Several GPUs split each batch with
    `accelerate launch --multi_gpu --num_processes N -m selma_toolkit train RECIPE --skill NAME`
    (or `torchrun --nproc_per_node N -m selma_toolkit train ...`, also on CPUs): the same samples
    and noise whatever the number of processes, so the same expert up to float rounding.
    """
    if (skill is None) == (not joint):
        raise SelmaError("train: give either --skill NAME (one expert) or --joint (the mixture baseline), one of the two")
    import torch
    from accelerate import PartialState
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from selma_toolkit.paths import JOINT, RunPaths
    from selma_toolkit.recipe import load_run_recipe
    from selma_toolkit.train import TrainEvent, train_expert

    run = load_run_recipe(recipe, set_ or [])
    paths = RunPaths.for_recipe(run, out)
    name = JOINT if joint else run.skill(skill).name
    _quiet_loading_bars()
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("accelerate").setLevel(logging.WARNING)  # else a line per file of every checkpoint
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[loss]}"),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
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

        expert = train_expert(run, name, paths, progress=show)
    if is_main:
        console.print(f"{name}: expert written to {expert}", soft_wrap=True, highlight=False)


# ----------------------------------------------------------------------------------------- merge


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        return [float(part) for part in text.split(",")]
    except ValueError:
        raise SelmaError(f"--weights {text!r}: expected comma-separated numbers, one per expert, e.g. 0.2,0.8") from None


def _file_size(size: int) -> str:
    return f"{size / 2**20:.1f} MiB" if size >= 2**20 else f"{size / 2**10:.1f} KiB"


@app.command("merge")
def merge(
    experts: Annotated[Optional[list[str]], typer.Argument(help="Expert LoRAs: .safetensors files, catalog names or Hub repo ids.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="The merged .safetensors file to write (with --to: default MERGED itself).")] = None,
    method: Annotated[Optional[str], typer.Option(help="selma (the paper: average A and B; the default), delta (exact sum of updates), svd, ties or dare.")] = None,
    weights: Annotated[Optional[str], typer.Option(help="One weight per expert, comma-separated (e.g. 0.2,0.8); default 1/T each.")] = None,
    rank: Annotated[Optional[int], typer.Option(help="Output rank for svd, ties and dare (default: the experts' largest).")] = None,
    format_: Annotated[Optional[str], typer.Option("--format", help="kohya (read by diffusers and ComfyUI; the default) or peft.")] = None,
    density: Annotated[Optional[float], typer.Option(help="ties: share of largest entries kept; dare: share of entries kept (default 0.5).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="dare: seed of the drop masks (default 0).")] = None,
    normalize: Annotated[bool, typer.Option(help="Divide the weights by their sum.")] = False,
    add: Annotated[Optional[list[str]], typer.Option("--add", help="With --to: an expert to add (file, catalog name or repo id; repeatable).")] = None,
    to: Annotated[Optional[Path], typer.Option("--to", help="A merged LoRA whose metadata lists its experts: add the --add experts to it.")] = None,
    expert_file: Annotated[Optional[list[Path]], typer.Option("--expert", help="With --to: a file of one of MERGED's experts, if it moved (matched by sha256; repeatable).")] = None,
) -> None:
    """Merge several LoRA experts into one LoRA file, or add experts to a merged one (--add NEW --to MERGED).

    --add/--to computes exactly the merge of MERGED's experts (found by the sha256 its metadata
    records: at their recorded paths, beside MERGED, in its run folder, via the Hub) plus the new
    ones, with MERGED's method and settings. Where an expert is missing, a selma or delta merge with
    uniform weights is updated exactly from MERGED's own factors; other merges are refused.
    """
    from selma_toolkit.hub import resolve_expert
    from selma_toolkit.lora.merge import MERGE_METHODS, merge_files

    if format_ not in (None, "kohya", "peft"):
        raise SelmaError(f"--format {format_!r}: expected kohya or peft")
    if to is not None or add:
        from selma_toolkit.lora.incremental import add_to_merge

        if to is None or not add:
            raise SelmaError("--add and --to go together: selma merge --add NEW.safetensors --to MERGED.safetensors [--out FILE]")
        if experts:
            raise SelmaError(f"{experts[0]}: with --to, the old experts come from {to}'s metadata; give new ones with --add (repeatable)")
        fixed = [name for name, value in (("--method", method), ("--rank", rank), ("--density", density), ("--seed", seed))
                 if value is not None] + (["--normalize"] if normalize else [])
        if fixed:
            raise SelmaError(f"{', '.join(fixed)}: adding to {to} keeps its merge settings (recorded in its metadata); to "
                             "change them, merge the experts from scratch: selma merge EXPERT... --out FILE")
        result = add_to_merge(to, [resolve_expert(ref) for ref in add], out, weights=_parse_weights(weights),
                              expert_files=expert_file or [], new_sources=_hub_refs(add), format=format_)  # type: ignore[arg-type]
        how = ("every listed expert found and verified: merged again from the files" if result.recomputed else
               "some listed experts not found: the merged factors were updated exactly (linear merge rule)")
        _print_merge(result.weights, result.path, f"added {len(add)} expert(s) to {to.name}")
        console.print(how, highlight=False, soft_wrap=True)
        return
    if not experts or out is None:
        raise SelmaError("selma merge: give the experts and --out FILE (or --add NEW --to MERGED to add experts to a merge)")
    if expert_file:
        raise SelmaError("--expert helps find the experts of a merged file and goes with --to MERGED")
    method = method or "selma"
    if method not in MERGE_METHODS:
        raise SelmaError(f"--method {method!r}: expected one of {', '.join(MERGE_METHODS)}")
    paths = [resolve_expert(expert) for expert in experts]
    merged = merge_files(
        paths, out, method, _parse_weights(weights), rank,  # type: ignore[arg-type]
        format=format_ or "kohya", density=0.5 if density is None else density, seed=seed or 0,  # type: ignore[arg-type]
        normalize=normalize, sources=_hub_refs(experts),
    )
    _print_merge(merged, out, f"merged {len(paths)} experts")


def _hub_refs(refs: list[str]) -> list[str | None]:
    """What the merge record keeps of each reference: catalog names and repo ids (so an incremental
    merge can resolve them again); None for local files (recorded by their relative path)."""
    return [None if Path(ref).expanduser().is_file() else ref for ref in refs]


def _print_merge(merged, out: Path, title: str) -> None:
    from rich.table import Table

    from selma_toolkit.lora.merge import merge_record

    record = merge_record(merged) or {}
    inputs = Table("expert", "skill", "weight", "sha256", title=escape(title))
    for info, weight in zip(record.get("experts", []), record.get("weights", [])):
        inputs.add_row(escape(info["name"]), escape(info.get("skill") or "-"), f"{weight:.6g}", info["sha256"][:12])
    console.print(inputs)
    summary = Table("modules", "ranks", "method", "file size", "file")
    ranks = sorted(merged.ranks())
    summary.add_row(
        str(len(merged.modules)), ", ".join(map(str, ranks)) if len(ranks) <= 4 else f"{ranks[0]}-{ranks[-1]}",
        record.get("method", "?"), _file_size(out.stat().st_size), escape(str(out)),
    )
    console.print(summary)


# ------------------------------------------------------------------------------------------- hub

hub_app = typer.Typer(help="Share and fetch experts on the Hugging Face Hub (push, pull, catalog).", no_args_is_help=True)
app.add_typer(hub_app, name="hub")
CatalogOption = Annotated[
    Optional[list[Path]],
    typer.Option("--catalog", help="Your own catalog file (TOML, as hub/catalog.toml); repeatable. SELMA_CATALOG=FILE works for every command."),
]


@hub_app.command("push")
def hub_push(
    path: Annotated[Path, typer.Argument(help="An expert .safetensors file, a merged LoRA, or a run folder.")],
    repo_id: Annotated[str, typer.Argument(help="Target model repo, owner/name (created if needed).")],
    private: Annotated[bool, typer.Option("--private", help="Create the repo as private (if it does not exist yet).")] = False,
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch to commit to (created if needed).")] = None,
    message: Annotated[Optional[str], typer.Option("--message", "-m", help="Commit message.")] = None,
) -> None:
    """Upload LoRA file(s), a model card, the recipe, scores and samples in one commit. Token: `hf auth login` or HF_TOKEN."""
    from selma_toolkit.hub import push_expert

    url = push_expert(path, repo_id, private=private, revision=revision, commit_message=message)
    console.print(f"pushed to {escape(url)}", highlight=False, soft_wrap=True)


@hub_app.command("pull")
def hub_pull(
    ref: Annotated[str, typer.Argument(help="A catalog name, or a repo owner/name (owner/name:FILE for one of several files).")],
    revision: Annotated[Optional[str], typer.Option("--revision", help="Branch, tag or commit.")] = None,
    to: Annotated[Optional[Path], typer.Option("--to", help="Also copy the file into this folder (e.g. ComfyUI/models/loras).")] = None,
    file: Annotated[Optional[str], typer.Option("--file", help="The .safetensors file in the repo, when it holds several.")] = None,
    catalog: CatalogOption = None,
) -> None:
    """Download an expert into the Hugging Face cache (works offline from the cache) and print its local path."""
    from selma_toolkit.hub import resolve_expert

    path = resolve_expert(ref, catalog=catalog, revision=revision, to=to, filename=file)
    sys.stdout.write(f"{path}\n")


@hub_app.command("list")
def hub_list(catalog: CatalogOption = None) -> None:
    """Show the catalog of published experts (and your own with --catalog)."""
    from rich.table import Table

    from selma_toolkit.hub import load_catalog

    entries = load_catalog(catalog)
    if not entries:
        console.print("the catalog is empty: no expert has been published in it yet; add your own with --catalog FILE")
        return
    table = Table("name", "skill", "base model", "arch", "repo", "file", "sha256")
    for entry in sorted(entries.values(), key=lambda e: e.name):
        table.add_row(*(escape(v) for v in (entry.name, entry.skill, entry.base_model, entry.architecture, entry.repo, entry.file)),
                      "pinned" if entry.sha256 else "-")
    console.print(table)


# -------------------------------------------------------------------------------------- evaluate


@app.command("evaluate")
def evaluate(
    run_dir: Annotated[Optional[Path], typer.Argument(
        help="A run folder: draw every variant on the held-out prompts, score them and write the report.")] = None,
    checkpoints: Annotated[bool, typer.Option(
        "--checkpoints", help="With RUN: score every saved checkpoint of each skill on held-out prompts; record the best.")] = False,
    final_experts: Annotated[bool, typer.Option(
        "--final-experts", help="With RUN: evaluate each skill's final expert even where a best checkpoint was selected.")] = False,
    tally: Annotated[Optional[list[Path]], typer.Option(
        "--tally", help="Count a human-evaluation answers file exported from human-eval.html (repeatable: raters).")] = None,
    report: Annotated[Optional[Path], typer.Option(
        "--report", help="Write the HTML report from an evaluation folder holding scores.json.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Report folder (default: report/ beside the evaluation folder).")] = None,
    pair: Annotated[Optional[list[str]], typer.Option(
        help="Human-evaluation pair VARIANT,BASELINE, e.g. merged:selma,base (repeatable; default: merged vs base).")] = None,
    prompts_per_skill: Annotated[int, typer.Option(help="Prompts per skill in the report's image grids.")] = 4,
    before: Annotated[Optional[str], typer.Option(
        help="With RUN: also compare RUN's merged LoRA with this one from before the new skill was added (a previous "
             "run folder, or a merged LoRA file / catalog name / repo id) on the new and the old skills' prompts.")] = None,
    method: Annotated[Optional[str], typer.Option(help="With --before: the merge method to compare (default: the run's).")] = None,
) -> None:
    """Evaluate a run folder, pick its best checkpoints, tally human answers, or write a report.

    RUN: draw every variant on the held-out prompts, score them, write the report (RUN --checkpoints:
    score every saved checkpoint and record the best). --tally: win/tie/lose of human-evaluation
    answers. --report: the HTML report of an evaluation folder holding scores.json.
    """
    if not tally and report is None and run_dir is None:
        raise SelmaError("selma evaluate: give a run folder RUN, --tally ANSWERS.json (human-evaluation answers) "
                         "or --report EVAL_DIR")
    if (checkpoints or final_experts) and run_dir is None:
        raise SelmaError("selma evaluate: --checkpoints and --final-experts need a run folder, e.g. selma evaluate runs/demo --checkpoints")
    if (before or method) and (run_dir is None or checkpoints):
        raise SelmaError("selma evaluate: --before (and --method) compare a run folder's merge with an earlier one, "
                         "e.g. selma evaluate runs/new-skill --before runs/old-skills")
    if run_dir is not None:
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
                raise SelmaError(f"--pair {bad[0]!r}: expected VARIANT,BASELINE, e.g. --pair merged:selma,base")
        target = out or report.resolve().parent / "report"
        index = write_report(report, target, human_eval_pairs=pairs, prompts_per_skill=prompts_per_skill)
        console.print(f"wrote {index}")
    if tally:
        from selma_toolkit.evaluate import tally_files

        # One plain line per pair (as the paper states its study), easy to read and to parse.
        for row in tally_files(tally):
            without_ties = ("all ties" if row.win_percent_without_ties is None
                            else f"{row.win_percent_without_ties:.1f}% vs {100 - row.win_percent_without_ties:.1f}% without ties")
            console.print(f"{row.variant} vs {row.baseline}: win {row.win_percent:.1f}%, tie {row.tie_percent:.1f}%, "
                          f"lose {row.lose_percent:.1f}% of {row.n} answers ({without_ties})", highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------------- run
# `selma run`, `selma status`, `selma demo`, and `selma evaluate RUN` (the library side: selma_toolkit/run.py).

_STAGE_MARKS = {"skip": "[dim]skip[/dim] ", "start": "[cyan]run[/cyan]  ", "done": "[green]done[/green] "}


def _stage_line(state, action: str | None = None) -> str:
    target = f" {state.target}" if state.target else ""
    mark = _STAGE_MARKS[action] if action else ("[green]done[/green] " if state.done else "[yellow]todo[/yellow] ")
    note = " (complete)" if action == "skip" else ""
    return f"{mark}{state.stage}{escape(target)}: {escape(state.detail)}{note}"


def _run_with_progress(work):
    """Call ``work(on_stage, progress)`` under one rich progress display: a status line per stage, a bar per task."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    _quiet_loading_bars()
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("accelerate").setLevel(logging.WARNING)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def on_stage(state, action: str) -> None:
            bar.console.print(_stage_line(state, action), highlight=False, soft_wrap=True)

        def progress(label: str, done: int, total: int | None) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done, total=total)

        return work(on_stage, progress)


def _run_recipe(run, paths, use_best: bool) -> None:
    from selma_toolkit.run import run_pipeline

    result = _run_with_progress(lambda on_stage, progress: run_pipeline(
        run, paths, use_best=use_best, on_stage=on_stage, progress=progress))
    console.print(f"run folder: {escape(str(result.root))}", highlight=False, soft_wrap=True)
    for method, path in result.merged.items():
        console.print(f"merged LoRA ({method}): {escape(str(path))}", highlight=False, soft_wrap=True)
    if result.report is not None:
        console.print(f"report: {escape(str(result.report))}", highlight=False, soft_wrap=True)


@app.command("run")
def run_command(
    recipe: Annotated[str, typer.Argument(help="Run recipe file or shipped name.")],
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default: the recipe's output_dir, else runs/<name>).")] = None,
    final_experts: Annotated[bool, typer.Option(
        "--final-experts", help="Merge each skill's final expert even where a best checkpoint was selected.")] = False,
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
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default: runs/demo).")] = None,
    threads: Annotated[int, typer.Option(
        help="CPU threads for torch (0: torch's default). The demo's models are tiny: one thread is as fast, and "
             "stays fast when another program keeps a core busy.")] = 1,
    set_: SetOption = None,
) -> None:
    """The whole loop on the embedded tiny model (recipes/runs/demo.toml): offline, no API key, minutes on a CPU."""
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
    final_experts: Annotated[bool, typer.Option("--final-experts", help="As `selma run --final-experts` would merge.")] = False,
) -> None:
    """Show what a run folder holds: each stage per skill, done or not, with counts."""
    from selma_toolkit.run import load_run_folder, run_status

    run, paths = load_run_folder(run_dir)
    states = run_status(run, paths, use_best=not final_experts)
    console.print(f"run {escape(run.name)} in {escape(str(paths.root))} (base model {escape(run.base_model)})",
                  highlight=False, soft_wrap=True)
    for state in states:
        console.print(_stage_line(state), highlight=False, soft_wrap=True)
    finished = sum(state.done for state in states)
    console.print(f"{finished}/{len(states)} stages done" + ("" if finished < len(states) else "; the run is complete"))


def _evaluate_run_folder(run_dir: Path, checkpoints: bool, final_experts: bool) -> None:
    from selma_toolkit.run import evaluate_run, load_run_folder

    run, paths = load_run_folder(run_dir)
    if checkpoints:
        from rich.table import Table

        from selma_toolkit.evaluate.checkpoints import select_checkpoints

        choices = _run_with_progress(lambda on_stage, progress: select_checkpoints(
            run, paths, progress=lambda done, total: progress("checkpoint images", done, total)))
        table = Table("skill", "checkpoint steps (mean)", "best", "expert", title="checkpoint selection (held-out prompts)")
        for skill, choice in choices.items():
            means = ", ".join(f"{step}: {'-' if mean is None else f'{mean:.4g}'}" for step, mean in choice.means.items())
            table.add_row(escape(skill), f"{choice.metric} {means}", str(choice.step), escape(str(choice.expert)))
        console.print(table)
        return
    index = _run_with_progress(lambda on_stage, progress: evaluate_run(
        run, paths, use_best=not final_experts, progress=lambda done, total: progress("evaluation images", done, total)))
    console.print(f"scores: {escape(str(paths.eval_dir / 'scores.json'))}", highlight=False, soft_wrap=True)
    console.print(f"report: {escape(str(index))}", highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------- new skill
# Teaching one more skill (docs/tutorial-new-skill.md): `selma skill new` (selma_toolkit/skill_new.py)
# and `selma evaluate RUN --before PREVIOUS` (selma_toolkit/evaluate/before_after.py); `selma merge
# --add/--to` is in the merge section.

skill_app = typer.Typer(help="Write new skill recipes.", no_args_is_help=True)
app.add_typer(skill_app, name="skill")


@skill_app.command("new")
def skill_new(
    name: Annotated[str, typer.Argument(help="The new skill's name (lower-case letters, digits, '-', '_').")],
    from_: Annotated[Optional[str], typer.Option("--from", help="Start from this skill recipe (shipped name such as coco, or a file).")] = None,
    source: Annotated[Optional[str], typer.Option(help="llm (an OpenAI-compatible endpoint) or grammar (offline); default: --from's, else llm.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="The recipe file to write (default: NAME.toml).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
    set_: SetOption = None,
) -> None:
    """Write a new skill recipe, every field explained in a comment, and validate it."""
    from selma_toolkit.skill_new import new_skill_recipe

    made = new_skill_recipe(name, out or Path(f"{name}.toml"), source=source, from_skill=from_, overrides=set_ or [],
                            force=force)
    console.print(f"wrote skill recipe {made.name!r} (source {made.source}) to {escape(str(made.path))}", highlight=False)
    if made.unfilled:
        console.print(f"fill in: {', '.join(made.unfilled)} (the <fill in: ...> texts), then check it with "
                      f"`selma recipe validate {escape(str(made.path))}`", highlight=False, soft_wrap=True)
    else:
        console.print(f"[green]OK[/green]: valid; list it in a run recipe: skills = [\"{escape(str(made.path))}\"]",
                      highlight=False, soft_wrap=True)


def _compare_before_after(run_dir: Path, before: str, method: str | None) -> None:
    from rich.table import Table

    from selma_toolkit.evaluate.before_after import compare_before_after, verdict_line
    from selma_toolkit.run import load_run_folder

    run, paths = load_run_folder(run_dir)
    result = _run_with_progress(lambda on_stage, progress: compare_before_after(
        run, paths, before, method=method, progress=lambda done, total: progress("before/after images", done, total)))
    table = Table("skill", "kind", "metric", "before", "after", "change [95% interval]", "verdict",
                  title="merged LoRA before and after adding the new skill(s)")
    for c in result.changes:
        table.add_row(escape(c.skill), c.kind, c.metric, f"{c.before:.4g}", f"{c.after:.4g}",
                      f"{c.change.mean:+.4g} [{c.change.low:+.4g}, {c.change.high:+.4g}]", c.verdict)
    console.print(table)
    for verdict in ("gained", "lost"):
        console.print(escape(verdict_line(result.changes, verdict)), highlight=False, soft_wrap=True)  # type: ignore[arg-type]
    console.print(f"comparison: {escape(str(result.folder / 'comparison.md'))}", highlight=False, soft_wrap=True)
    console.print(f"before/after report: {escape(str(result.report))}", highlight=False, soft_wrap=True)


# ------------------------------------------------------------------------------------------ lora

lora_app = typer.Typer(help="Inspect and convert LoRA files (kohya, diffusers/peft, ComfyUI layouts).", no_args_is_help=True)
app.add_typer(lora_app, name="lora")
ComponentOption = Annotated[
    Optional[str],
    typer.Option(help="Model part of peft keys that lack a prefix (unet, text_encoder, text_encoder_2)."),
]
DropBiasDiffsOption = Annotated[
    bool, typer.Option("--drop-bias-diffs", help="Drop bias / norm differences (ComfyUI-trained files) a LoRA cannot carry.")
]


@lora_app.command("info")
def lora_info(
    file: Annotated[Path, typer.Argument(help="A LoRA .safetensors file.")],
    component: ComponentOption = None,
    drop_bias_diffs: DropBiasDiffsOption = False,
) -> None:
    """Show a LoRA file: layout, architecture guess, modules, ranks, alphas, metadata."""
    from collections import Counter

    from rich.table import Table

    from selma_toolkit.lora import inspect_lora

    info = inspect_lora(file, component=component, drop_bias_diffs=drop_bias_diffs)
    modules = info.weights.modules
    per_component = Counter(name.split(".", 1)[0] for name in modules)
    ranks = Counter(module.rank for module in modules.values())
    alphas = Counter(float(module.alpha) for module in modules.values())
    conv = sum(module.is_conv for module in modules.values())
    summary = Table(show_header=False, title=escape(str(file)))
    summary.add_row("layout", ", ".join(info.layouts))
    summary.add_row("architecture", info.architecture or "unknown (no shape or metadata tells)")
    summary.add_row("modules", f"{len(modules)} ({', '.join(f'{c} {n}' for c, n in sorted(per_component.items()))}"
                    + (f"; {conv} conv" if conv else "") + ")")
    summary.add_row("ranks", ", ".join(f"{rank} x{count}" for rank, count in sorted(ranks.items())))
    summary.add_row("alphas", ", ".join(f"{alpha:g} x{count}" for alpha, count in sorted(alphas.items())))
    console.print(summary)
    if info.file_metadata:
        table = Table("metadata key", "value", title="__metadata__")
        for key, value in sorted(info.file_metadata.items()):
            table.add_row(escape(key), escape(value if len(value) <= 200 else value[:200] + "..."))
        console.print(table)


@lora_app.command("convert")
def lora_convert(
    source: Annotated[Path, typer.Argument(help="The LoRA .safetensors file to read (any layout).")],
    out: Annotated[Path, typer.Argument(help="The .safetensors file to write.")],
    format_: Annotated[str, typer.Option("--format", help="kohya (read by diffusers and ComfyUI) or peft (diffusers).")] = "kohya",
    component: ComponentOption = None,
    drop_bias_diffs: DropBiasDiffsOption = False,
) -> None:
    """Convert a LoRA file to the kohya layout (default; diffusers and ComfyUI load it) or peft."""
    from selma_toolkit.lora import WRITE_FORMATS, load_lora, save_lora

    if format_ not in WRITE_FORMATS:
        raise SelmaError(f"--format {format_!r}: expected one of {', '.join(WRITE_FORMATS)}")
    if out.resolve() == source.resolve():
        raise SelmaError(f"{out}: the output would overwrite the input; choose another file name")
    weights = load_lora(source, component=component, drop_bias_diffs=drop_bias_diffs)
    save_lora(weights, out, format=format_)  # type: ignore[arg-type]
    console.print(f"wrote {len(weights.modules)} modules in the {format_} layout to {escape(str(out))}", highlight=False)


# --------------------------------------------------------------------------------------- comfyui

comfyui_app = typer.Typer(help="The SELMA node pack for ComfyUI.", no_args_is_help=True)
app.add_typer(comfyui_app, name="comfyui")


@comfyui_app.command("install")
def comfyui_install(
    comfyui_dir: Annotated[Path, typer.Argument(help="The ComfyUI folder (the one with main.py and custom_nodes/).")],
) -> None:
    """Copy the node pack into COMFYUI_DIR/custom_nodes/selma-toolkit (run again to update it)."""
    from comfyui_nodes.install import install_node_pack

    target = install_node_pack(comfyui_dir)
    console.print(f"installed the SELMA nodes into {escape(str(target))}; restart ComfyUI to load them "
                  "(its Python needs torch and safetensors)", highlight=False)


# -------------------------------------------------------------------------------------- toyworld
# The shapes world (selma_toolkit/toyworld): ground-truth renders, the toy base model `toy:shapes`, the study.

toyworld_app = typer.Typer(help="The shapes world: exact faithfulness scores, the toy base model, the SELMA study.",
                           no_args_is_help=True)
app.add_typer(toyworld_app, name="toyworld")


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


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
        raise SelmaError(f"{exc}; see `selma toyworld --help` and selma_toolkit/toyworld/world.py for the grammar") from None
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
        raise SelmaError(str(exc)) from None
    if not image.is_file():
        raise SelmaError(f"{image}: no such image file")
    with Image.open(image) as opened:
        picture = opened.convert("RGB")
    answers = answer_questions(scene, segment(picture))
    for question in caption_questions(scene):
        console.print(f"{question.id}. {question.text} -> {answers[question.id]}", highlight=False)
    console.print(f"score {score_image(picture, caption):.1f}")


@toyworld_app.command("pretrain")
def toyworld_pretrain(
    out: Annotated[Path, typer.Option(help="Pretraining folder (checkpoint, snapshots, logs); rerun to resume.")],
    seed: Annotated[int, typer.Option(help="The run is a pure function of the settings and this seed.")] = 0,
    steps: Annotated[int, typer.Option(help="UNet + text-encoder steps (a shorter run is a prefix of a longer one).")] = 8000,
    vae_steps: Annotated[int, typer.Option(help="VAE steps (stage 1).")] = 600,
    batch_size: Annotated[int, typer.Option(help="UNet batch size.")] = 64,
    learning_rate: Annotated[float, typer.Option(help="UNet + text-encoder learning rate (constant after warm-up).")] = 5e-4,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint and EMA snapshot every N steps.")] = 500,
    eval_every: Annotated[int, typer.Option(help="Score the EMA snapshot on held-out prompts every N steps (0: never).")] = 500,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads (default: torch's choice). Results "
                                                        "depend slightly on it (floating-point sums).")] = None,
) -> None:
    """Pretrain the toy base model on ground-truth renders (VAE, then UNet + text encoder with EMA)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from selma_toolkit.toyworld.pretrain import PretrainSettings, pretrain

    _set_threads(threads)
    settings = PretrainSettings(seed=seed, steps=steps, vae_steps=vae_steps, batch_size=batch_size,
                                learning_rate=learning_rate, checkpoint_every=checkpoint_every, eval_every=eval_every)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("loss {task.fields[loss]:.4f}"))
    with Progress(*columns, console=err_console) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int, loss: float) -> None:
            if stage not in tasks:
                tasks[stage] = bar.add_task(stage, total=total, loss=loss)
            bar.update(tasks[stage], completed=done, loss=loss)

        snapshot = pretrain(out, settings, progress=progress)
    console.print(f"latest EMA snapshot: {escape(str(snapshot))}; export it with "
                  f"`selma toyworld export {escape(str(out))} --to FOLDER`", highlight=False, soft_wrap=True)


@toyworld_app.command("study")
def toyworld_study(
    recipe: Annotated[str, typer.Argument(help="Run recipe (file or shipped name), e.g. toy-study.")] = "toy-study",
    out: Annotated[Path, typer.Option(help="Study folder; rerun to resume.")] = Path("runs/toy-study"),
    seed: Annotated[Optional[list[int]], typer.Option(
        help="Run only these replicate seeds (repeatable; default: evaluate.seeds). The summary covers every finished one.")] = None,
    filter_min_score: Annotated[float, typer.Option(
        min=0, max=100, help="Filtered experts train on self-generated images scoring at least this.")] = 100.0,
    filter_candidates: Annotated[int, typer.Option(
        min=1, help="Self-generated candidates per prompt for the filtered experts (the first that passes is kept).")] = 4,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads (default: torch's choice).")] = None,
    set_: SetOption = None,
) -> None:
    """SELMA on the toy base, scored exactly: base, experts on self-generated / ground-truth / filtered
    images, the mixture LoRA and the merges, per seed; then study.md, study.json and study.png."""
    from selma_toolkit.recipe import load_run_recipe
    from selma_toolkit.toyworld.study import run_study

    _set_threads(threads)
    run = load_run_recipe(recipe, set_ or [])
    summary = _run_with_progress(lambda on_stage, progress: run_study(
        run, out, seeds=seed, filter_min_score=filter_min_score, filter_candidates=filter_candidates, progress=progress))
    console.print(f"study summary: {escape(str(summary))}", highlight=False, soft_wrap=True)
    console.print(f"per-seed reports: {escape(str(out))}/seed-*/report/index.html", highlight=False, soft_wrap=True)


@toyworld_app.command("export")
def toyworld_export(
    run_dir: Annotated[Path, typer.Argument(help="A pretraining folder.")],
    to: Annotated[Path, typer.Option(help="Diffusers folder to write (replaced whole), e.g. selma_toolkit/toyworld/base.")],
    step: Annotated[Optional[int], typer.Option(help="Snapshot step (default: the latest).")] = None,
) -> None:
    """Write an EMA snapshot of a pretraining run as a diffusers pipeline folder (fp16 safetensors)."""
    from selma_toolkit.toyworld.snapshots import export_base, snapshot_path

    target = export_base(run_dir, snapshot_path(run_dir, step), to)
    console.print(f"wrote {escape(str(target))}", highlight=False)


def main() -> None:
    """Entry point of the `selma` console script."""
    try:
        app()
    except SelmaError as exc:
        err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False, soft_wrap=True)
        sys.exit(1)
