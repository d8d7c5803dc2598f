"""`selma toyworld study`: the SELMA experiment on the toy base, scored exactly, over several seeds.

For each seed ``s`` in ``evaluate.seeds`` (a replicate: its own self-generated images, expert
training and evaluation noise; images.seed = train.seed = s), under ``<out>/seed-<s>/``:

* ``selma/``    a run folder (selma_toolkit.paths): the skills' prompts, one image per train prompt
                drawn by the base model itself (stage 2), one LoRA expert per skill (stage 3), the
                mixture LoRA on all skills' images (``joint``), and the merged experts (stage 4,
                ``merge.method`` and ``evaluate.merge_methods``);
* ``gt/``       the same prompts with ground-truth renders instead (the paper's GT-vs-generated
                comparison), and their experts;
* ``filtered/`` beyond the paper, the scorer as a data filter (best of K): per train prompt, the
                first of ``filter_candidates`` self-generated images (the one in ``selma/``, then one
                per ``candidates-<k>/`` folder, drawn with image seed ``s + 1000 k``) whose toyworld
                score is at least ``filter_min_score``; prompts without one are left out; and their experts;
* ``keyq/``     the same candidates filtered per question: the first whose questions of the skill's
                key attribute (KEY_QUESTIONS: count / colour / relation) are right;
* ``lowcfg/``, ``highcfg/``  self-generated images at guidance 1 and at ``high_guidance``;
* ``teacher/``  images drawn by another base (``teacher``): weak-to-strong (the paper's Table 3);
* ``selma/dpo/``, ``selma/moe/``  the paper's Table 4 baselines (kinds ``dpo`` and ``moe``): DPO
                experts on scored pairs of base images (``[dpo]``, the toyworld score picks the
                winner) and their merge, variant ``dpo``; the SELMA experts under a learned gate
                (``[moe]``), variant ``moe``;
* ``eval/``     evaluation images on the held-out prompts (paired noise: the same initial noise for
                every variant), ``scores.json`` and ``report/``: variants ``base``, ``base-cfg1``
                (the base at guidance 1), ``joint`` and ``merged:<method>`` on every skill;
                ``<kind prefix>:<skill>`` experts (KINDS) on their own skill.

Which kinds run is :class:`StudyOptions` (``selma toyworld study --kind ...``); each replicate
records them, and the mean toyworld score of every kind's training images (how well the data
show their prompts), in ``replicate.json``.

Every stage is the toolkit's own (generate_prompts, generate_images, train_expert, merge_files,
draw_eval_images, score_variants, write_report), so each resumes after a stop; a rerun skips what
is done. The summary over seeds (``study.json``, ``study.md``, ``study.png``) is written by
:mod:`selma_toolkit.toyworld.study_report`.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from selma_toolkit.config.recipes import RunRecipe
from selma_toolkit.dataset import METADATA, read_image_dataset, read_prompts
from selma_toolkit.errors import RecipeError, Remedy
from selma_toolkit.evaluate.generate import EvalJob, draw_eval_images, heldout_prompts
from selma_toolkit.evaluate.report import write_report
from selma_toolkit.evaluate.scoring import score_variants, variant_folder
from selma_toolkit.images import generate_images, image_name, image_seed
from selma_toolkit.io import atomic_write_bytes, atomic_write_text
from selma_toolkit.paths import JOINT, RunPaths
from selma_toolkit.prompts import generate_prompts
from selma_toolkit.recipe import write_resolved_recipe
from selma_toolkit.toyworld.renderer import render_caption
from selma_toolkit.toyworld.scorer import ToyWorldScorer, key_questions_pass, score_image
from selma_toolkit.toyworld.study_kinds import ALL_KINDS, BASE_LOW_GUIDANCE, BASELINE_KINDS, KINDS
from selma_toolkit.toyworld.study_report import write_study_report
from selma_toolkit.toyworld.world import CaptionError, parse_caption

log = logging.getLogger(__name__)

RUN_KINDS = tuple(BASELINE_KINDS)
DATA_KINDS = tuple(KINDS)
EXPERT_PREFIX = {kind: prefix for kind, (prefix, _) in KINDS.items()}
# The question kind (toyworld scorer) that says whether an image shows each toy skill's point.
KEY_QUESTIONS = {"toy-count": "count", "toy-color": "color", "toy-spatial": "relation"}
CANDIDATE_SEED_STEP = 1000
Progress = Callable[[str, int, "int | None"], None]


def replicate_recipe(run: RunRecipe, seed: int) -> RunRecipe:
    """The run of one replicate: image, training and evaluation seeds set to ``seed``."""
    return run.model_copy(update={
        "images": run.images.model_copy(update={"seed": seed}),
        "train": run.train.model_copy(update={"seed": seed}),
        "evaluate": run.evaluate.model_copy(update={"seeds": [seed]}),
    })


def check_study_recipe(run: RunRecipe) -> None:
    """The study needs toy skills with grammar prompts and the toyworld scorer; say what is missing."""
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
    if problems:
        raise RecipeError(f"run recipe {run.name!r} cannot drive the shapes-world study:\n  " + "\n  ".join(problems)
                          + "\nStart from recipes/runs/toy-study.toml.")


# ------------------------------------------------------------------------------------ datasets


def _write_dataset(folder: Path, examples: list[tuple[int, str, str, object]], extra: dict[str, object]) -> None:
    """An imagefolder dataset: ``examples`` of (prompt id, skill, caption, PIL image or source path)."""
    rows = []
    for prompt_id, skill, caption, image in examples:
        name = image_name(prompt_id)
        if isinstance(image, Path):
            data = image.read_bytes()
        else:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            data = buffer.getvalue()
        atomic_write_bytes(folder / name, data)
        atomic_write_text(folder / image_name(prompt_id, "txt"), caption)
        rows.append(json.dumps({"file_name": name, "text": caption, "prompt_id": prompt_id, "skill": skill, **extra}) + "\n")
    # metadata.jsonl last: its presence marks the dataset complete.
    atomic_write_text(folder / METADATA, "".join(rows))


def write_ground_truth(run: RunRecipe, skill: str, paths: RunPaths) -> int:
    """Ground-truth renders of ``skill``'s train prompts into ``paths.images(skill)``; each
    placement drawn from ``image_seed(images.seed, prompt id)``. Returns the number of images."""
    folder = paths.images(skill)
    prompts = sorted(read_prompts(paths.prompts(skill), split="train"), key=lambda p: p.id)
    if not (folder / METADATA).is_file():
        seed = run.images.seed
        examples = [(p.id, skill, p.prompt, render_caption(p.prompt, random.Random(image_seed(seed, p.id)))) for p in prompts]
        _write_dataset(folder, examples, {"source": "ground-truth render", "seed": seed})
    return len(prompts)


def write_filtered(sources: list[RunPaths], skill: str, paths: RunPaths, min_score: float,
                   key_question: str | None = None) -> tuple[int, int]:
    """Best-of-K filtering: for each train prompt of ``skill``, the first of its self-generated
    candidates (one per run folder in ``sources``, in order) that passes, copied into
    ``paths.images(skill)``: its toyworld score is at least ``min_score``, or, with
    ``key_question`` (a scorer question kind such as "count"), its questions of that kind are
    right. Returns (prompts kept, prompts); when none passes, nothing is written but the record
    (that expert is left out of the replicate, with a warning, rather than stopping the study)."""
    from PIL import Image

    def passes(image, caption: str) -> bool:
        if key_question is not None:
            return bool(key_questions_pass(image, caption, key_question))
        score = score_image(image, caption)
        return score is not None and score >= min_score

    candidates = [{int(r.extra["prompt_id"]): r for r in read_image_dataset(source.images(skill))} for source in sources]
    folder = paths.images(skill)
    record_path = folder / ".selma-filter.json"
    wanted = {"min_score": min_score, "candidates": len(sources), "key_question": key_question}
    if record_path.is_file():
        done = json.loads(record_path.read_text())
        if all(done.get(key) == value for key, value in wanted.items()):
            return done["kept"], done["total"]
    kept = []
    for prompt_id, first in sorted(candidates[0].items()):
        for records in candidates:
            record = records.get(prompt_id)
            if record is None:
                continue
            with Image.open(record.path) as image:
                if passes(image.convert("RGB"), record.text):
                    kept.append((prompt_id, skill, record.text, record.path))
                    break
    total = len(candidates[0])
    rule = f"its {key_question} questions right" if key_question else f"scoring {min_score} or more"
    folder.mkdir(parents=True, exist_ok=True)
    if kept:
        _write_dataset(folder, kept, {"source": f"self-generated, best of {len(sources)}, {rule}"})
    else:
        log.warning("%s: none of the %d prompts has a self-generated image (of %d per prompt) with %s: no expert is "
                    "trained on this data (lower --filter-min-score or raise --filter-candidates)",
                    sources[0].images(skill), total, len(sources), rule)
    atomic_write_text(record_path, json.dumps({**wanted, "kept": len(kept), "total": total}) + "\n")
    return len(kept), total


# ------------------------------------------------------------------------------------ a replicate


def _copy_prompts(source: RunPaths, target: RunPaths, skill: str) -> None:
    if not target.prompts(skill).is_file():
        atomic_write_bytes(target.prompts(skill), source.prompts(skill).read_bytes())


def _mean_score(folder: Path) -> float:
    """Mean toyworld score of an image dataset's images on their own captions."""
    from PIL import Image

    values = []
    for record in read_image_dataset(folder):
        with Image.open(record.path) as image:
            values.append(score_image(image.convert("RGB"), record.text) or 0.0)
    return round(sum(values) / max(1, len(values)), 2)


def _train(run: RunRecipe, paths: RunPaths, names: list[str], label: str, progress: Progress) -> None:
    from selma_toolkit.train import train_expert

    for name in names:
        if not paths.expert(name).is_file():
            train_expert(run, name, paths, progress=lambda e, n=name: progress(f"{label} {n}", e.done, e.total))


@dataclass(frozen=True)
class StudyOptions:
    """What a study runs beyond its recipe (recorded in every replicate.json).

    ``kinds``: the data kinds of KINDS to train experts on ("selma" is always run);
    ``filter_min_score`` / ``filter_candidates``: the best-of-K filters; ``high_guidance``: the
    guidance of the "highcfg" images; ``teacher``: the base model that draws the "teacher" images.
    """

    kinds: tuple[str, ...] = ("selma", "gt", "filtered")
    filter_min_score: float = 100.0
    filter_candidates: int = 4
    high_guidance: float = 8.0
    teacher: str | None = None

    def __post_init__(self) -> None:
        unknown = [kind for kind in self.kinds if kind not in ALL_KINDS]
        if unknown:
            raise RecipeError(f"study kinds {', '.join(map(repr, unknown))}: expected some of {', '.join(ALL_KINDS)}")
        if "teacher" in self.kinds and not self.teacher:
            raise RecipeError(what="needs a teacher base model", where="study kind 'teacher'",
                              remedies=[Remedy.give("teacher", "toy:shapes", noun="a base model (a folder, a Hub id)")])
        if self.filter_candidates < 1 or self.high_guidance < 1:
            raise RecipeError("filter_candidates and high_guidance must be at least 1")
        object.__setattr__(self, "kinds", tuple(dict.fromkeys(("selma", *self.kinds))))


def _with_images(run: RunRecipe, **update: object) -> RunRecipe:
    """``run`` with some [images] settings changed (the image seed of a candidate set, a guidance, a model)."""
    return run.model_copy(update={"images": run.images.model_copy(update=update)})


def _image_runs(run: RunRecipe, options: StudyOptions) -> dict[str, RunRecipe]:
    """The recipe that draws each self-generated kind's images (same prompts and image seeds)."""
    recipes = {"selma": run, "lowcfg": _with_images(run, guidance_scale=1.0),
               "highcfg": _with_images(run, guidance_scale=options.high_guidance)}
    if options.teacher:
        recipes["teacher"] = _with_images(run, model=options.teacher)
    return {kind: recipe for kind, recipe in recipes.items() if kind in options.kinds}


def _table4_baselines(run: RunRecipe, selma: RunPaths, skills: list[str], kinds: tuple[str, ...],
                      progress: Progress) -> dict[str, tuple[Path | None, list[str]]]:
    """Train the ``dpo`` / ``moe`` kinds from the SELMA run folder; their evaluation variants."""
    variants: dict[str, tuple[Path | None, list[str]]] = {}
    if "dpo" in kinds:
        from selma_toolkit.train.dpo import (
            dpo_is_current,
            dpo_merge_is_current,
            dpo_merged,
            dpo_paths,
            merge_dpo,
            preference_pairs,
            train_dpo_expert,
        )

        trained = []
        for skill in skills:
            if not dpo_is_current(run, selma, skill)[0]:
                if not preference_pairs(run, skill, selma):  # every pair a tie: left out, as a filter that keeps nothing
                    log.warning("%s: every DPO preference pair is a tie; no DPO expert (raise dpo.pairs_per_prompt)", skill)
                    continue
                train_dpo_expert(run, skill, selma, progress=lambda e, s=skill: progress(f"dpo {s}", e.done, e.total))
            trained.append(skill)
        variants.update({f"{BASELINE_KINDS['dpo'][0]}:{s}": (dpo_paths(selma).expert(s), [s]) for s in trained})
        if trained == skills:  # the variant "dpo" is the merge of every skill's DPO expert
            if not dpo_merge_is_current(run, selma):
                merge_dpo(run, selma)
            variants["dpo"] = (dpo_merged(run, selma), skills)
    if "moe" in kinds:
        from selma_toolkit.train.moe import moe_file, moe_is_current, train_moe

        experts = [(s, selma.expert(s)) for s in skills]
        if not moe_is_current(run, selma, experts)[0]:
            train_moe(run, selma, experts, progress=lambda e: progress("moe gate", e.done, e.total))
        variants["moe"] = (moe_file(selma), skills)
    return variants


def run_replicate(run: RunRecipe, out: Path, seed: int, options: StudyOptions | None = None, *,
                  progress: Progress | None = None) -> dict[str, object]:
    """Every stage of one replicate (see the module docstring); returns its record (also written
    to ``seed-<s>/replicate.json``) with the data sizes and the path of its scores.json."""
    from selma_toolkit.lora.merge import merge_files

    options = options or StudyOptions()
    report = progress or (lambda label, done, total: None)
    run = replicate_recipe(run, seed)
    root = out / f"seed-{seed}"
    kinds = options.kinds
    data_kinds = [kind for kind in kinds if kind not in RUN_KINDS]  # kinds with a dataset of their own
    roots = {kind: RunPaths(root / kind) for kind in data_kinds}
    skills = [s.name for s in run.skills]
    selma = roots["selma"]
    for paths in roots.values():
        write_resolved_recipe(run, paths.root)
    if "keyq" in kinds:
        missing = [s for s in skills if s not in KEY_QUESTIONS]
        if missing:
            raise RecipeError(f"study kind 'keyq': no key question kind for skill(s) {', '.join(missing)}; "
                              f"known: {', '.join(f'{k} ({v})' for k, v in KEY_QUESTIONS.items())}")

    for skill in run.skills:
        generate_prompts(skill, selma.prompts(skill.name), run.evaluate.prompts_per_skill)
        for kind in data_kinds[1:]:
            _copy_prompts(selma, roots[kind], skill.name)
    # Extra self-generated candidates for best-of-K filtering: the same stage with other image seeds.
    filtering = [k for k in ("filtered", "keyq") if k in kinds]
    extra = [(RunPaths(root / f"candidates-{k}"), _with_images(run, seed=seed + CANDIDATE_SEED_STEP * k))
             for k in range(1, options.filter_candidates)] if filtering else []
    drawn = _image_runs(run, options)
    data: dict[str, dict[str, object]] = {}
    for skill in skills:
        for kind, kind_run in drawn.items():
            stats = generate_images(kind_run, skill, roots[kind],
                                    progress=lambda d, t, s=skill, k=kind: report(f"{k} images {s}", d, t))
            data.setdefault(kind, {})[skill] = stats.images
        if "gt" in kinds:
            data.setdefault("gt", {})[skill] = write_ground_truth(run, skill, roots["gt"])
        for paths, candidate_run in extra:
            _copy_prompts(selma, paths, skill)
            generate_images(candidate_run, skill, paths, progress=lambda d, t, s=skill: report(f"candidates {s}", d, t))
        for kind in filtering:
            kept, total = write_filtered([selma, *(paths for paths, _ in extra)], skill, roots[kind],
                                         options.filter_min_score, KEY_QUESTIONS[skill] if kind == "keyq" else None)
            data.setdefault(kind, {})[skill] = kept
            log.info("seed %d, %s, %s: %d of %d prompts kept (best of %d)", seed, kind, skill, kept, total,
                     options.filter_candidates)

    # A filter may keep no image of a skill: that expert is left out (write_filtered warns).
    trained = {kind: [s for s in skills if (roots[kind].images(s) / METADATA).is_file()] for kind in data_kinds}
    image_scores = {kind: {skill: _mean_score(roots[kind].images(skill)) for skill in trained[kind]} for kind in data_kinds}
    _train(run, selma, skills + ([JOINT] if run.joint else []), "train", report)
    for kind in data_kinds[1:]:
        _train(run, roots[kind], trained[kind], f"train {kind}", report)
    methods = list(dict.fromkeys([run.merge.method, *run.evaluate.merge_methods]))
    for method in methods:
        if not selma.merged(method).is_file():
            merge_files([selma.expert(s) for s in skills], selma.merged(method), method, run.merge.weights,  # type: ignore[arg-type]
                        run.merge.rank, format=run.train.lora_format, density=run.merge.density, seed=run.merge.seed)

    eval_dir = root / "eval"
    prompts = heldout_prompts(run, selma)
    variants: dict[str, tuple[Path | None, list[str]]] = {"base": (None, skills)}
    for kind in data_kinds:
        variants.update({f"{EXPERT_PREFIX[kind]}:{s}": (roots[kind].expert(s), [s]) for s in trained[kind]})
    variants.update(_table4_baselines(run, selma, skills, kinds, report))
    if run.joint:
        variants["joint"] = (selma.expert(JOINT), skills)
    variants.update({f"merged:{m}": (selma.merged(m), skills) for m in methods})
    jobs = [EvalJob(name, eval_dir / "images" / variant_folder(name), lora, {s: prompts[s] for s in chosen})
            for name, (lora, chosen) in variants.items()]
    items = draw_eval_images(run, jobs, progress=lambda d, t: report("evaluation images", d, t))
    items.update(draw_eval_images(_with_images(run, guidance_scale=1.0), [EvalJob(BASE_LOW_GUIDANCE, eval_dir / "images" / variant_folder(BASE_LOW_GUIDANCE),
                                                     None, prompts)],
                                  progress=lambda d, t: report("evaluation images, guidance 1", d, t)))
    score_variants(items, [ToyWorldScorer()], eval_dir, bootstrap_samples=run.evaluate.bootstrap_samples,
                   batch_size=run.evaluate.batch_size)
    write_report(eval_dir, root / "report", title=f"Shapes-world study: {run.name}, seed {seed}",
                 prompts_per_skill=run.evaluate.report_prompts_per_skill, human_eval_pairs=run.evaluate.human_eval_pairs or None)
    record = {"seed": seed, "base_model": run.base_model, "train_images": data, "train_image_scores": image_scores,
              "options": asdict(options),
              "filter_min_score": options.filter_min_score, "filter_candidates": options.filter_candidates,
              "scores": str((eval_dir / "scores.json").relative_to(out)), "merge_methods": methods}
    atomic_write_text(root / "replicate.json", json.dumps(record, indent=1) + "\n")
    return record


def run_study(run: RunRecipe, out: str | Path, options: StudyOptions | None = None, *, seeds: list[int] | None = None,
              progress: Progress | None = None) -> Path:
    """Run (or resume) the replicates for ``seeds`` (default: the recipe's evaluate.seeds), then
    summarise every finished replicate in ``out``; return the path of study.md."""
    check_study_recipe(run)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_resolved_recipe(run, out)
    for seed in seeds if seeds is not None else run.evaluate.seeds:
        log.info("study %s: replicate seed %d", run.name, seed)
        run_replicate(run, out, seed, options, progress=progress)
    return write_study_report(out, run)
