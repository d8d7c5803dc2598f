"""`selma run`: a whole SELMA run, stage after stage, and `selma status`: what a run folder holds.

Stages, in order (selma_toolkit.paths says where each writes):

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
with images on disk) is refused, naming each change; and the listed experts are checked to fit the
base model. Derived outputs (selection, merges, evaluation) are redone when what they were made
from has changed. One process at a time works in a run folder: `selma run` and `selma evaluate RUN`
hold its lock (io.folder_lock, an OS lock that a killed process never leaves behind) and a second
one is refused, naming the holder.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from selma_toolkit.errors import DatasetError, Remedy, SelmaError
from selma_toolkit.io import check_output_folder, folder_lock
from selma_toolkit.paths import JOINT, RunPaths
from selma_toolkit.recipe import RunRecipe, load_run_recipe, write_resolved_recipe
from selma_toolkit.run_checks import (
    ExternalExpert,
    check_recipe_change,
    merge_methods,
    resolve_external_experts,
)

log = logging.getLogger(__name__)

STAGES = ("prompts", "images", "train", "select", "merge", "evaluate")


@dataclass(frozen=True)
class StageState:
    """One line of a run's status: a stage for one target (a skill, ``joint``, a merge method, or "")."""

    stage: str
    target: str
    done: bool
    detail: str


StageCallback = Callable[[StageState, Literal["skip", "start", "done"]], None]
ProgressCallback = Callable[[str, int, "int | None"], None]


@dataclass(frozen=True)
class RunResult:
    root: Path
    experts: list[tuple[str, Path]]  # what was merged, in order
    merged: dict[str, Path]  # merge method -> file
    report: Path | None


def load_run_folder(folder: str | Path) -> tuple[RunRecipe, RunPaths]:
    """The recipe recorded in a run folder (``recipe.toml``) and the folder's paths."""
    paths = RunPaths(Path(folder))
    if not paths.recipe.is_file():
        raise DatasetError(what="not a run folder (no recipe.toml)", where=str(folder),
                           expected="a folder written by `selma run`",
                           remedies=[Remedy.run("selma run RECIPE --out FOLDER", note="to give the recipe")])
    return load_run_recipe(paths.recipe), paths


# ----------------------------------------------------------------------------- stage states


def prompts_state(run: RunRecipe, skill: str, paths: RunPaths) -> StageState:
    """Done when the prompt file holds the skill's train prompts and evaluate.prompts_per_skill held-out ones."""
    from selma_toolkit.dataset import read_prompts

    wanted, heldout = run.skill(skill).num_prompts, run.evaluate.prompts_per_skill
    path = paths.prompts(skill)
    records = read_prompts(path, repair_tail=True) if path.is_file() else []
    train = sum(r.split == "train" for r in records)
    held = sum(r.split == "heldout" for r in records)
    return StageState("prompts", skill, train >= wanted and held >= heldout,
                      f"{min(train, wanted)}/{wanted} train, {min(held, heldout)}/{heldout} held-out")


def images_state(run: RunRecipe, skill: str, paths: RunPaths) -> StageState:
    """Done when every train prompt has its image and caption and metadata.jsonl lists them all."""
    from selma_toolkit.dataset import METADATA, read_prompts
    from selma_toolkit.images import image_name
    from selma_toolkit.io import read_jsonl

    folder, image_format = paths.images(skill), run.images.image_format
    prompt_file = paths.prompts(skill)
    train = read_prompts(prompt_file, split="train", repair_tail=True) if prompt_file.is_file() else []
    drawn = sum((folder / image_name(p.id, "txt")).is_file() and (folder / image_name(p.id, image_format)).is_file() for p in train)
    listed = {row.get("prompt_id") for row in read_jsonl(folder / METADATA)} if (folder / METADATA).is_file() else set()
    done = bool(train) and drawn == len(train) and listed >= {p.id for p in train}
    note = "" if done or not drawn else ", dataset not finished"
    return StageState("images", skill, done, f"{drawn}/{len(train)} images{note}")


def train_state(run: RunRecipe, name: str, paths: RunPaths) -> StageState:
    """Done when the last checkpoint is at train.steps and the expert file is written."""
    from selma_toolkit.train.checkpoint import checkpoints

    saved = checkpoints(paths.train_dir(name))
    step = saved[-1].step if saved else 0
    done = step == run.train.steps and paths.expert(name).is_file()
    return StageState("train", name, done, f"step {step}/{run.train.steps}, {len(saved)} checkpoint(s)"
                      + (", expert written" if paths.expert(name).is_file() else ""))


def selection_state(run: RunRecipe, paths: RunPaths) -> StageState:
    """Done when every skill has a current checkpoint selection (evaluate/checkpoints.py)."""
    from selma_toolkit.evaluate.checkpoints import current_selection

    choices = {s.name: current_selection(run, paths, s.name) for s in run.skills}
    detail = ", ".join(f"{skill}: step {c.step}" if c else f"{skill}: not selected" for skill, c in choices.items())
    return StageState("select", "", all(choices.values()), detail)


def merge_inputs(run: RunRecipe, paths: RunPaths, externals: list[ExternalExpert], use_best: bool = True
                 ) -> list[tuple[str, Path]]:
    """(name, file) of every expert to merge, in order: each skill's expert (its best checkpoint
    where a current selection exists and ``use_best``), then the recipe's external experts."""
    from selma_toolkit.evaluate.checkpoints import selected_expert

    chosen = [(s.name, selected_expert(run, paths, s.name) if use_best else paths.expert(s.name)) for s in run.skills]
    return chosen + [(e.name, e.path) for e in externals]


def _merge_settings(run: RunRecipe, method: str, count: int) -> dict[str, Any]:
    """The merge record fields (lora/merging/record.py) a merge of ``count`` experts with the recipe's
    settings has; which settings a method records is the method table's rule (``recorded_settings``)."""
    from selma_toolkit.lora.merge import expert_weights
    from selma_toolkit.lora.merging.methods import recorded_settings

    settings = recorded_settings(method, rank=run.merge.rank, density=run.merge.density, seed=run.merge.seed)
    del settings["svd_mode"]  # recipes always merge with the exact SVD: never compared
    return {"method": method, "weights": expert_weights(run.merge.weights, count, method=method), **settings}


def merge_state(run: RunRecipe, paths: RunPaths, method: str, inputs: list[tuple[str, Path]]) -> StageState:
    """Done when merged/<method>.safetensors records exactly these inputs (sha256) and settings."""
    from safetensors import safe_open

    from selma_toolkit.io import sha256_file
    from selma_toolkit.lora.merge import metadata_record

    from safetensors import SafetensorError

    path = paths.merged(method)
    names = ", ".join(name for name, _ in inputs)
    if not path.is_file():
        return StageState("merge", method, False, f"not merged yet ({names})")
    try:
        with safe_open(str(path), framework="pt") as handle:
            record = metadata_record(handle.metadata() or {}) or {}
    except (SafetensorError, OSError, ValueError):  # damaged (truncated, overwritten): merged again, atomically
        return StageState("merge", method, False, f"{len(inputs)} experts ({names}), {path.name} is damaged")
    wanted = _merge_settings(run, method, len(inputs))
    current = ([e.get("sha256") for e in record.get("experts", [])] == [sha256_file(p) for _, p in inputs]
               and all(record.get(key) == value for key, value in wanted.items()))
    return StageState("merge", method, current, f"{len(inputs)} experts ({names})" + ("" if current else ", out of date"))


def eval_variants(run: RunRecipe, paths: RunPaths, inputs: list[tuple[str, Path]]) -> dict[str, Path | None]:
    """``{variant: LoRA file or None}``: base, every merged expert, joint (when trained), every merge."""
    variants: dict[str, Path | None] = {"base": None}
    variants.update({f"expert:{name}": path for name, path in inputs})
    if run.joint and paths.expert(JOINT).is_file():
        variants["joint"] = paths.expert(JOINT)
    variants.update({f"merged:{m}": paths.merged(m) for m in merge_methods(run) if paths.merged(m).is_file()})
    variants.update(baseline_variants(run, paths))
    return variants


def baseline_variants(run: RunRecipe, paths: RunPaths) -> dict[str, Path]:
    """The paper's Table 4 baselines where trained: ``moe`` (MoE-LoRA file) and ``dpo`` (the merged DPO experts)."""
    from selma_toolkit.train.dpo import dpo_merged
    from selma_toolkit.train.moe import moe_file

    found = {"moe": moe_file(paths), "dpo": dpo_merged(run, paths)}
    return {name: path for name, path in found.items() if path.is_file()}


def moe_state(run: RunRecipe, paths: RunPaths, inputs: list[tuple[str, Path]]) -> StageState:
    """Done when the MoE-LoRA holds exactly the merged experts (sha256), the recipe's gate and moe.steps."""
    from selma_toolkit.train.moe import moe_is_current

    done, detail = moe_is_current(run, paths, inputs)
    return StageState("train", "moe", done, detail)


def dpo_state(run: RunRecipe, skill: str, paths: RunPaths) -> StageState:
    """Done when the skill's DPO expert has dpo.steps of training and is written."""
    from selma_toolkit.train.dpo import dpo_is_current

    done, detail = dpo_is_current(run, paths, skill)
    return StageState("train", f"dpo:{skill}", done, detail)


def dpo_merge_state(run: RunRecipe, paths: RunPaths) -> StageState:
    """Done when the merged DPO file records exactly the current DPO experts."""
    from selma_toolkit.train.dpo import dpo_merge_is_current, dpo_merged

    done = dpo_merge_is_current(run, paths)
    return StageState("merge", "dpo", done, f"{run.merge.method} merge of the DPO experts, {dpo_merged(run, paths).name}"
                      + ("" if done else ": not merged yet or out of date"))


def evaluation_state(run: RunRecipe, paths: RunPaths, inputs: list[tuple[str, Path]]) -> StageState:
    """Done when scores and report were made from exactly the current variants and settings."""
    from selma_toolkit.evaluate.generate import evaluation_is_current

    variants = eval_variants(run, paths, inputs)
    done = evaluation_is_current(run, paths, variants)
    state = f"report {paths.report}" if done else "out of date" if paths.report.is_file() else "not evaluated yet"
    return StageState("evaluate", "", done, f"{state}; {len(variants)} variants")


def run_status(run: RunRecipe, paths: RunPaths, *, use_best: bool = True) -> list[StageState]:
    """Every stage's state, in order; stages that cannot be judged yet say what they wait for.
    Listed experts that are not local files are resolved through the Hub cache (hub.resolve_expert)."""
    states = [prompts_state(run, s.name, paths) for s in run.skills]
    states += [images_state(run, s.name, paths) for s in run.skills]
    states += [train_state(run, name, paths) for name in _trained_names(run)]
    if run.evaluate.select_checkpoints and use_best and run.skills:
        states.append(_guarded("select", "", lambda: selection_state(run, paths)))
    try:
        inputs = merge_inputs(run, paths, resolve_external_experts(run, check_fit=False), use_best)
        missing = [str(path) for _, path in inputs if not path.is_file()]
    except SelmaError as exc:
        inputs, missing = [], [str(exc)]
    for method in merge_methods(run):
        states.append(StageState("merge", method, False, f"waits for {', '.join(missing)}") if missing
                      else _guarded("merge", method, lambda m=method: merge_state(run, paths, m, inputs)))
    if run.dpo.enabled:
        states += [_guarded("train", f"dpo:{s.name}", lambda s=s: dpo_state(run, s.name, paths)) for s in run.skills]
        states.append(_guarded("merge", "dpo", lambda: dpo_merge_state(run, paths)))
    if run.moe.enabled:
        states.append(StageState("train", "moe", False, f"waits for {', '.join(missing)}") if missing
                      else _guarded("train", "moe", lambda: moe_state(run, paths, inputs)))
    if _evaluates(run):
        states.append(StageState("evaluate", "", False, "waits for the experts") if missing
                      else _guarded("evaluate", "", lambda: evaluation_state(run, paths, inputs)))
    return states


def _guarded(stage: str, target: str, state: Callable[[], StageState]) -> StageState:
    try:
        return state()
    except SelmaError as exc:
        return StageState(stage, target, False, f"cannot tell: {exc}")


def _trained_names(run: RunRecipe) -> list[str]:
    return [s.name for s in run.skills] + ([JOINT] if run.joint and run.skills else [])


def _evaluates(run: RunRecipe) -> bool:
    return bool(run.skills) and run.evaluate.prompts_per_skill > 0


# ------------------------------------------------------------------------------- the run


def _merge(run: RunRecipe, paths: RunPaths, method: str, inputs: list[tuple[str, Path]]) -> None:
    from selma_toolkit.lora.merge import merge_files

    settings = _merge_settings(run, method, len(inputs))
    merge_files([path for _, path in inputs], paths.merged(method), method, run.merge.weights,  # type: ignore[arg-type]
                settings["rank"], format=run.train.lora_format, density=run.merge.density, seed=run.merge.seed)


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
    from selma_toolkit.lora.merge import expert_weights

    notify = on_stage or (lambda state, action: None)
    report = progress or (lambda label, done, total: None)

    def stage(state: Callable[[], StageState], work: Callable[[], Any]) -> None:
        before = state()
        if before.done:
            notify(before, "skip")
            return
        notify(before, "start")
        work()
        notify(state(), "done")

    check_output_folder(paths.root)  # read-only checks first: a refused run creates nothing
    check_recipe_change(run, paths)
    externals = resolve_external_experts(run)  # before any work: a misfit expert fails now
    for method in merge_methods(run):
        expert_weights(run.merge.weights, len(run.skills) + len(externals), method=method)
    if run.evaluate.select_checkpoints and use_best and run.skills:
        from selma_toolkit.evaluate.scorers import build_scorers

        build_scorers(run.evaluate)  # scorer settings are checked before hours of training
    # One process at a time writes a run folder: a second `selma run` on it is refused here (io.folder_lock).
    with folder_lock(paths.root, "selma run"):
        check_recipe_change(run, paths)  # again under the lock: a run that just ended may have recorded another recipe
        write_resolved_recipe(run, paths.root)
        return _run_stages(run, paths, externals, use_best, stage, report)


def _run_stages(run: RunRecipe, paths: RunPaths, externals: list[ExternalExpert], use_best: bool,
                stage: Callable[[Callable[[], StageState], Callable[[], Any]], None],
                report: ProgressCallback) -> RunResult:
    """Every stage in order, under the run folder's lock (run_pipeline)."""
    from selma_toolkit.evaluate.checkpoints import select_checkpoints
    from selma_toolkit.evaluate.generate import evaluate_variants
    from selma_toolkit.images import check_image_inputs, generate_images
    from selma_toolkit.prompts import generate_prompts
    from selma_toolkit.train import train_expert

    for skill in run.skills:
        stage(lambda s=skill: prompts_state(run, s.name, paths),
              lambda s=skill: generate_prompts(s, paths.prompts(s.name), run.evaluate.prompts_per_skill,
                                               progress=lambda st, s=s: report(f"prompts {s.name}", st.kept, st.target)))
    for skill in run.skills:
        check_image_inputs(run, skill.name, paths)
    for skill in run.skills:
        stage(lambda s=skill: images_state(run, s.name, paths),
              lambda s=skill: generate_images(run, s.name, paths,
                                              progress=lambda d, t, s=s: report(f"images {s.name}", d, t)))
    for name in _trained_names(run):
        stage(lambda n=name: train_state(run, n, paths),
              lambda n=name: train_expert(run, n, paths,
                                          progress=lambda e, n=n: report(f"{'train' if e.kind == 'step' else 'cache'} {n}",
                                                                                 e.done, e.total)))
    if run.evaluate.select_checkpoints and use_best and run.skills:
        stage(lambda: selection_state(run, paths),
              lambda: select_checkpoints(run, paths, progress=lambda d, t: report("checkpoint images", d, t)))
    inputs = merge_inputs(run, paths, externals, use_best)
    for method in merge_methods(run):
        stage(lambda m=method: merge_state(run, paths, m, inputs), lambda m=method: _merge(run, paths, m, inputs))
    _run_baselines(run, paths, inputs, stage, report)
    index = None
    if _evaluates(run):
        stage(lambda: evaluation_state(run, paths, inputs),
              lambda: evaluate_variants(run, paths, eval_variants(run, paths, inputs),
                                        progress=lambda d, t: report("evaluation images", d, t)))
        index = paths.report
    return RunResult(paths.root, inputs, {m: paths.merged(m) for m in merge_methods(run)}, index)


def _run_baselines(run: RunRecipe, paths: RunPaths, inputs: list[tuple[str, Path]],
                   stage: Callable[[Callable[[], StageState], Callable[[], Any]], None], report: ProgressCallback) -> None:
    """The paper's Table 4 baselines the recipe enables: DPO experts and their merge, the MoE-LoRA gate."""
    if run.dpo.enabled:
        from selma_toolkit.train.dpo import merge_dpo, train_dpo_expert

        for skill in run.skills:
            stage(lambda s=skill: dpo_state(run, s.name, paths),
                  lambda s=skill: train_dpo_expert(run, s.name, paths,
                                                   progress=lambda e, s=s: report(f"dpo {s.name}", e.done, e.total)))
        stage(lambda: dpo_merge_state(run, paths), lambda: merge_dpo(run, paths))
    if run.moe.enabled:
        from selma_toolkit.train.moe import train_moe

        stage(lambda: moe_state(run, paths, inputs),
              lambda: train_moe(run, paths, inputs, progress=lambda e: report("moe gate", e.done, e.total)))


def evaluate_run(run: RunRecipe, paths: RunPaths, *, use_best: bool = True,
                 progress: Callable[[int, int], None] | None = None) -> Path:
    """`selma evaluate RUN`: (re)merge what is missing or out of date, then evaluate every variant
    on the held-out prompts and write the report; return its index.html."""
    if not _evaluates(run):
        raise DatasetError(f"run {run.name!r}: nothing to evaluate (it needs skills with held-out prompts; "
                           f"evaluate.prompts_per_skill = {run.evaluate.prompts_per_skill})")
    if use_best and run.evaluate.select_checkpoints:
        from selma_toolkit.evaluate.checkpoints import current_selection

        unselected = [s.name for s in run.skills if current_selection(run, paths, s.name) is None]
        if unselected:
            log.warning("no current checkpoint selection for %s: their final experts are evaluated; run "
                        "`selma evaluate %s --checkpoints` first to evaluate the best checkpoints",
                        ", ".join(unselected), paths.root)
    with folder_lock(paths.root, "selma evaluate"):  # not beside a `selma run` writing this folder
        return _evaluate_locked(run, paths, use_best, progress)


def _evaluate_locked(run: RunRecipe, paths: RunPaths, use_best: bool,
                     progress: Callable[[int, int], None] | None) -> Path:
    from selma_toolkit.evaluate.generate import evaluate_variants

    inputs = merge_inputs(run, paths, resolve_external_experts(run), use_best)
    missing = [name for name, path in inputs if not path.is_file()]
    if missing:
        raise DatasetError(what=f"no expert yet for {', '.join(missing)}", where=str(paths.root),
                           remedies=[Remedy.run("selma run RECIPE"), Remedy.run("selma train RECIPE --skill NAME")])
    for method in merge_methods(run):
        if not merge_state(run, paths, method, inputs).done:
            log.info("merging %d experts with %s into %s", len(inputs), method, paths.merged(method))
            _merge(run, paths, method, inputs)
    from selma_toolkit.train.dpo import dpo_paths, merge_dpo

    dpo_trained = run.dpo.enabled and all(dpo_paths(paths).expert(s.name).is_file() for s in run.skills)
    if dpo_trained and not dpo_merge_state(run, paths).done:
        merge_dpo(run, paths)
    return evaluate_variants(run, paths, eval_variants(run, paths, inputs), progress=progress)
