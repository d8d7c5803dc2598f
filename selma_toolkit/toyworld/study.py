"""`selma toyworld study`: the SELMA experiment on the toy base, scored exactly, over several seeds.

For each seed ``s`` in ``evaluate.seeds`` (a replicate: its own self-generated images, expert
training and evaluation noise; images.seed = train.seed = s), under ``<out>/seed-<s>/``, one run
folder (selma_toolkit.paths) per data kind (KINDS) that the options ask for, each with one LoRA
expert per skill trained on that kind's images:

* ``selma/``    the skills' prompts (every kind's folder copies them) and one image per train
                prompt drawn by the base model itself (the paper's data);
* ``gt/``       ground-truth renders of the same prompts (the paper's GT-vs-generated comparison);
* ``filtered/`` the exact scorer as a data filter (best of K): per train prompt, the first of
                ``filter_candidates`` self-generated images (the one in ``selma/``, then one per
                ``candidates-<k>/`` folder, image seed ``s + 1000 k``) whose toyworld score is at
                least ``filter_min_score``; prompts without one are left out;
* ``keyq/``     the same candidates filtered per question (the skill's KEY_QUESTIONS right);
* ``bon4/``, ``bon8/``  best of 4 / 8 self-generated candidates chosen by the recipe's judge
                (``images.judge``, not the evaluation's scorer): the images stage's own best-of-N;
* ``lowcfg/``, ``highcfg/``  self-generated images at guidance 1 and at ``high_guidance``;
* ``teacher/``  images drawn by another base (``teacher``): weak-to-strong (the paper's Table 3);
* ``round2/``   a second round: images drawn by the base with round 1's merged SELMA experts fused
                in (``round2/round1-model/``);
* ``selma/dpo/``, ``selma/moe/``  the paper's Table 4 baselines (kinds ``dpo`` and ``moe``): DPO
                experts on scored pairs of base images (``[dpo]``: ``dpo.scorer`` picks the winner,
                ``"judge"`` for the recipe's judge) and their merge, variant ``dpo``; the SELMA
                experts under a learned gate (``[moe]``), variant ``moe``;
* ``eval/``     evaluation images on the held-out prompts, or the development prompts
                (``prompt_set = "dev"``, study_data.dev_prompts, for sizing a study), with paired
                noise (the same initial noise for every variant), ``scores.json`` and ``report/``:
                ``base``, ``base-cfg<g>`` (the base at the other guidances of ``guidances``),
                ``<kind prefix>:<skill>`` experts on their own skill, and for each kind of
                ``merge_kinds`` its merged experts and its mixture LoRA on every skill (``joint``
                and ``merged:<method>`` for ``selma``; ``<kind>-joint``, ``<kind>-merged:<method>``).

Which kinds run is :class:`StudyOptions` (``selma toyworld study --kind ...``); each replicate
records them, and the mean toyworld score of every kind's training images (how well the data
show their prompts), in ``replicate.json``.

Every stage is the toolkit's own (generate_prompts, generate_images, train_expert, merge_files,
draw_eval_images, score_variants, write_report), so each resumes after a stop; a rerun skips what
is done. The summary over seeds (``study.json``, ``study.md``, ``study.png``) is written by
:mod:`selma_toolkit.toyworld.study_report`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from selma_toolkit.config.recipes import RunRecipe
from selma_toolkit.dataset import METADATA
from selma_toolkit.errors import RecipeError, Remedy
from selma_toolkit.evaluate.generate import (
    EvalJob,
    draw_eval_images,
    heldout_prompts,
)
from selma_toolkit.evaluate.report import write_report
from selma_toolkit.evaluate.scoring import score_variants, variant_folder
from selma_toolkit.images import generate_images
from selma_toolkit.images.best_of import load_judge
from selma_toolkit.io import atomic_write_text
from selma_toolkit.paths import JOINT, RunPaths
from selma_toolkit.prompts import generate_prompts
from selma_toolkit.recipe import write_resolved_recipe
from selma_toolkit.toyworld.scorer import ToyWorldScorer
from selma_toolkit.toyworld.study_data import (
    copy_prompts,
    dev_prompts,
    image_scores,
    judge_agreement,
    mean_score,
    write_filtered,
    write_ground_truth,
)
from selma_toolkit.toyworld.study_kinds import (
    ALL_KINDS,
    BEST_OF,
    EXPERT_PREFIX,
    RUN_KINDS,
)
from selma_toolkit.toyworld.study_report import write_study_report
from selma_toolkit.toyworld.study_variants import (
    fused_model,
    merge_experts,
    table4_baselines,
    train_experts,
)
from selma_toolkit.toyworld.world import CaptionError, parse_caption

log = logging.getLogger(__name__)

# The question kind (toyworld scorer) that says whether an image shows each toy skill's point.
KEY_QUESTIONS = {"toy-count": "count", "toy-color": "color", "toy-spatial": "relation"}
CANDIDATE_SEED_STEP = 1000
Progress = Callable[[str, int, "int | None"], None]


def base_variant(guidance: float) -> str:
    """The variant name of the base drawn at another guidance: ``base-cfg1``, ``base-cfg16``, ``base-cfg2.5``."""
    return f"base-cfg{guidance:g}"


def merged_variant(kind: str, method: str) -> str:
    """``merged:<method>`` for the SELMA experts, ``<kind>-merged:<method>`` for another kind's."""
    return f"merged:{method}" if kind == "selma" else f"{kind}-merged:{method}"


def joint_variant(kind: str) -> str:
    """``joint`` (one LoRA on the mixture of the skills' SELMA images) or ``<kind>-joint``."""
    return JOINT if kind == "selma" else f"{kind}-{JOINT}"


def replicate_recipe(run: RunRecipe, seed: int) -> RunRecipe:
    """The run of one replicate: image, training and evaluation seeds set to ``seed``."""
    return run.model_copy(
        update={
            "images": run.images.model_copy(update={"seed": seed}),
            "train": run.train.model_copy(update={"seed": seed}),
            "evaluate": run.evaluate.model_copy(update={"seeds": [seed]}),
        }
    )


def check_study_recipe(run: RunRecipe, options: StudyOptions | None = None) -> None:
    """The study needs toy skills with grammar prompts and the toyworld scorer (and a judge for
    the best-of-N kinds); say what is missing."""

    problems = []
    if "toyworld" not in run.evaluate.scorers:
        problems.append("evaluate.scorers must include 'toyworld'")
    if run.evaluate.prompts_per_skill < 1:
        problems.append("evaluate.prompts_per_skill must be at least 1 (held-out prompts are what is scored)")
    for skill in run.skills:
        if skill.source != "grammar":
            problems.append(f"skill {skill.name!r} has source {skill.source!r}; the study uses shapes-world grammars")
        for seed_prompt in skill.seeds:
            try:
                parse_caption(seed_prompt)
            except CaptionError as exc:
                problems.append(f"skill {skill.name!r}: {exc}")
    if not run.skills:
        problems.append("skills: the study needs at least one toy skill (e.g. toy-count)")
    kinds = options.kinds if options else ()
    if any(kind in BEST_OF for kind in kinds) and not run.images.judge:
        problems.append(
            "kinds bon4 / bon8 need images.judge (the scorer that picks the best candidate, e.g. "
            'judge = "clipscore" with judge_model = "toy:judge")'
        )
    if "keyq" in kinds and (missing := [s.name for s in run.skills if s.name not in KEY_QUESTIONS]):
        problems.append(
            f"kind keyq: no key question kind for skill(s) {', '.join(missing)}; known: "
            f"{', '.join(f'{k} ({v})' for k, v in KEY_QUESTIONS.items())}"
        )
    if problems:
        raise RecipeError(
            f"run recipe {run.name!r} cannot drive the shapes-world study:\n  "
            + "\n  ".join(problems)
            + "\nStart from recipes/runs/toy-study.toml."
        )


@dataclass(frozen=True)
class StudyOptions:
    """What a study runs beyond its recipe (recorded in every replicate.json).

    ``kinds``: the data kinds of KINDS (and BASELINE_KINDS) to train experts on; ``merge_kinds``:
    the kinds whose experts are also merged (``evaluate.merge_methods`` and ``merge.method``) and
    trained as one LoRA on their mixture (when the recipe's ``joint`` is set); ``prompt_set``:
    where every variant is scored, ``heldout`` (the measurement) or ``dev`` (the development
    stream, for sizing); ``guidances``: the other guidance scales the base is drawn at (variants
    ``base-cfg<g>``); ``filter_min_score`` / ``filter_candidates``: the best-of-K exact filters;
    ``high_guidance``: the guidance of the "highcfg" images; ``teacher``: the base model that draws
    the "teacher" images.
    """

    kinds: tuple[str, ...] = ("selma", "gt", "filtered")
    merge_kinds: tuple[str, ...] = ("selma",)
    prompt_set: Literal["heldout", "dev"] = "heldout"
    guidances: tuple[float, ...] = (1.0,)
    filter_min_score: float = 100.0
    filter_candidates: int = 4
    high_guidance: float = 8.0
    teacher: str | None = None

    def __post_init__(self) -> None:
        unknown = [kind for kind in (*self.kinds, *self.merge_kinds) if kind not in ALL_KINDS]
        if unknown:
            raise RecipeError(f"study kinds {', '.join(map(repr, unknown))}: expected some of {', '.join(ALL_KINDS)}")
        if "teacher" in self.kinds and not self.teacher:
            raise RecipeError(
                what="needs a teacher base model",
                where="study kind 'teacher'",
                remedies=[Remedy.give("teacher", "toy:shapes", noun="a base model (a folder, a Hub id)")],
            )
        if self.filter_candidates < 1 or self.high_guidance < 1 or any(g < 1 for g in self.guidances):
            raise RecipeError("filter_candidates, high_guidance and every guidance must be at least 1")
        needs_selma = (
            [kind for kind in (*self.kinds, *self.merge_kinds) if kind in ("round2", "moe", "filtered", "keyq")]
            if "selma" not in self.kinds
            else []
        )
        if needs_selma:
            raise RecipeError(f"study kinds {', '.join(needs_selma)} are built from the SELMA run: add the kind selma")
        if any(kind in RUN_KINDS for kind in self.merge_kinds):
            raise RecipeError("merge_kinds: dpo and moe are merged (or gated) by their own stage; list data kinds only")
        object.__setattr__(self, "kinds", tuple(dict.fromkeys(self.kinds)))
        object.__setattr__(self, "merge_kinds", tuple(k for k in dict.fromkeys(self.merge_kinds) if k in self.kinds))


# ------------------------------------------------------------------------------------ a replicate


def _with_images(run: RunRecipe, **update: object) -> RunRecipe:
    """``run`` with some [images] settings changed (the image seed of a candidate set, a guidance, a model)."""
    return run.model_copy(update={"images": run.images.model_copy(update=update)})


def _image_runs(run: RunRecipe, options: StudyOptions) -> dict[str, RunRecipe]:
    """The recipe that draws each self-generated kind's images (same prompts and image seeds); the
    round-2 kind is drawn later, from round 1's merge."""
    recipes = {
        "selma": run,
        "lowcfg": _with_images(run, guidance_scale=1.0),
        "highcfg": _with_images(run, guidance_scale=options.high_guidance),
        **{kind: _with_images(run, candidates=n) for kind, n in BEST_OF.items()},
    }
    if options.teacher:
        recipes["teacher"] = _with_images(run, model=options.teacher)
    return {kind: recipe for kind, recipe in recipes.items() if kind in options.kinds}


def _datasets(
    run: RunRecipe, root: Path, roots: dict[str, RunPaths], options: StudyOptions, report: Progress
) -> dict[str, dict[str, int]]:
    """Every data kind's training images but round 2's (drawn, rendered or filtered); images per skill."""

    selma, seed, skills = roots["selma"], run.images.seed, [s.name for s in run.skills]
    filtering = [k for k in ("filtered", "keyq") if k in options.kinds]
    extra = (
        [
            (RunPaths(root / f"candidates-{k}"), _with_images(run, seed=seed + CANDIDATE_SEED_STEP * k))
            for k in range(1, options.filter_candidates)
        ]
        if filtering
        else []
    )
    data: dict[str, dict[str, int]] = {}
    for skill in skills:
        for kind, kind_run in _image_runs(run, options).items():
            stats = generate_images(
                kind_run, skill, roots[kind], progress=lambda d, t, s=skill, k=kind: report(f"{k} images {s}", d, t)
            )
            data.setdefault(kind, {})[skill] = stats.images
        if "gt" in options.kinds:
            data.setdefault("gt", {})[skill] = write_ground_truth(run, skill, roots["gt"])
        for paths, candidate_run in extra:
            copy_prompts(selma, paths, skill)
            generate_images(candidate_run, skill, paths, progress=lambda d, t, s=skill: report(f"candidates {s}", d, t))
        for kind in filtering:
            kept, total = write_filtered(
                [selma, *(paths for paths, _ in extra)],
                skill,
                roots[kind],
                options.filter_min_score,
                KEY_QUESTIONS[skill] if kind == "keyq" else None,
            )
            data.setdefault(kind, {})[skill] = kept
            log.info(
                "seed %d, %s, %s: %d of %d prompts kept (best of %d)",
                seed,
                kind,
                skill,
                kept,
                total,
                options.filter_candidates,
            )
    return data


def run_replicate(
    run: RunRecipe, out: Path, seed: int, options: StudyOptions | None = None, *, progress: Progress | None = None
) -> dict[str, object]:
    """Every stage of one replicate (see the module docstring); returns its record (also written
    to ``seed-<s>/replicate.json``) with the data sizes and the path of its scores.json."""

    options = options or StudyOptions()
    report = progress or (lambda label, done, total: None)
    run = replicate_recipe(run, seed)
    root = out / f"seed-{seed}"
    data_kinds = [kind for kind in options.kinds if kind not in RUN_KINDS]  # kinds with a dataset of their own
    # The "selma" folder holds the prompts (and the SELMA data when that kind runs).
    roots = {kind: RunPaths(root / kind) for kind in dict.fromkeys(["selma", *data_kinds])}
    skills = [s.name for s in run.skills]
    selma = roots["selma"]
    for paths in roots.values():
        write_resolved_recipe(run, paths.root)
    for skill in run.skills:
        generate_prompts(skill, selma.prompts(skill.name), run.evaluate.prompts_per_skill)
        for kind in data_kinds:
            copy_prompts(selma, roots[kind], skill.name)
    data = _datasets(run, root, roots, options, report)
    methods = list(dict.fromkeys([run.merge.method, *run.evaluate.merge_methods]))
    if "selma" in options.kinds:
        train_experts(run, selma, skills, "train selma", report)
        merge_experts(run, selma, skills, methods)
    if "round2" in options.kinds:  # round 2 draws with round 1's merged SELMA experts fused into the base
        model = fused_model(run, selma.merged(run.merge.method), roots["round2"].root / "round1-model")
        for skill in skills:
            stats = generate_images(
                _with_images(run, model=str(model)),
                skill,
                roots["round2"],
                progress=lambda d, t, s=skill: report(f"round2 images {s}", d, t),
            )
            data.setdefault("round2", {})[skill] = stats.images

    # A filter may keep no image of a skill: that expert is left out (write_filtered warns).
    trained = {kind: [s for s in skills if (roots[kind].images(s) / METADATA).is_file()] for kind in data_kinds}
    item_scores = {
        kind: {skill: image_scores(roots[kind].images(skill)) for skill in trained[kind]} for kind in data_kinds
    }
    agreement = {}
    if run.images.judge and "selma" in options.kinds:  # the judge against the exact scorer on the base's own images
        agreement = {skill: judge_agreement(selma.images(skill), load_judge(run.images)) for skill in skills}
    for kind in data_kinds:
        train_experts(run, roots[kind], trained[kind], f"train {kind}", report)
    for kind in options.merge_kinds:
        if trained[kind] == skills:
            train_experts(run, roots[kind], [JOINT] if run.joint else [], f"train {kind}", report)
            merge_experts(run, roots[kind], skills, methods)

    eval_dir = root / "eval"
    if options.prompt_set == "dev":
        prompts = dev_prompts(run, selma, root / "dev-prompts")
    else:
        prompts = heldout_prompts(run, selma)
    variants: dict[str, tuple[Path | None, list[str]]] = {"base": (None, skills)}
    for kind in data_kinds:
        variants.update({f"{EXPERT_PREFIX[kind]}:{s}": (roots[kind].expert(s), [s]) for s in trained[kind]})
    variants.update(table4_baselines(run, selma, skills, options.kinds, report))
    for kind in options.merge_kinds:
        if trained[kind] == skills:
            if run.joint:
                variants[joint_variant(kind)] = (roots[kind].expert(JOINT), skills)
            variants.update({merged_variant(kind, m): (roots[kind].merged(m), skills) for m in methods})
    jobs = [
        EvalJob(name, eval_dir / "images" / variant_folder(name), lora, {s: prompts[s] for s in chosen})
        for name, (lora, chosen) in variants.items()
    ]
    items = draw_eval_images(run, jobs, progress=lambda d, t: report("evaluation images", d, t))
    for guidance in options.guidances:
        name = base_variant(guidance)
        items.update(
            draw_eval_images(
                _with_images(run, guidance_scale=guidance),
                [EvalJob(name, eval_dir / "images" / variant_folder(name), None, prompts)],
                progress=lambda d, t, n=name: report(f"evaluation images, {n}", d, t),
            )
        )
    score_variants(
        items,
        [ToyWorldScorer()],
        eval_dir,
        bootstrap_samples=run.evaluate.bootstrap_samples,
        batch_size=run.evaluate.batch_size,
    )
    write_report(
        eval_dir,
        root / "report",
        title=f"Shapes-world study: {run.name}, seed {seed}",
        prompts_per_skill=run.evaluate.report_prompts_per_skill,
        human_eval_pairs=run.evaluate.human_eval_pairs or None,
    )
    record = {
        "seed": seed,
        "base_model": run.base_model,
        "train_images": data,
        "train_image_scores": {kind: {s: mean_score(v) for s, v in per.items()} for kind, per in item_scores.items()},
        "train_item_scores": item_scores,
        "options": asdict(options),
        "prompt_set": options.prompt_set,
        "judge_agreement": agreement,
        "guidance": run.images.guidance_scale,
        "filter_min_score": options.filter_min_score,
        "filter_candidates": options.filter_candidates,
        "scores": str((eval_dir / "scores.json").relative_to(out)),
        "merge_methods": methods,
    }
    atomic_write_text(root / "replicate.json", json.dumps(record, indent=1) + "\n")
    return record


def run_study(
    run: RunRecipe,
    out: str | Path,
    options: StudyOptions | None = None,
    *,
    seeds: list[int] | None = None,
    progress: Progress | None = None,
) -> Path:
    """Run (or resume) the replicates for ``seeds`` (default: the recipe's evaluate.seeds), then
    summarise every finished replicate in ``out``; return the path of study.md."""

    check_study_recipe(run, options)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_resolved_recipe(run, out)
    for seed in seeds if seeds is not None else run.evaluate.seeds:
        log.info("study %s: replicate seed %d", run.name, seed)
        run_replicate(run, out, seed, options, progress=progress)
    return write_study_report(out, run)
